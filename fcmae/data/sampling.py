"""Data order, per-sample seeding and the DataLoader, so that a run is exact: what step k sees is a function of
(seed, epoch, position) alone, whatever the worker count, and after a resume mid-epoch.

The epoch travels with the index: `EpochSampler` yields `(epoch, index)` pairs and `SeededDataset` seeds each
sample's augmentation from (seed, epoch, index). So one DataLoader with persistent workers serves every epoch
(`make_loader`): its workers hold copies of the dataset made when they started, which never learn of an epoch
set later in the main process, but the sampler runs in the main process (a DataLoader creates the sampler's
iterator there at each `iter(loader)`), so `sampler.set_epoch(epoch, start)` before `iter(loader)` is enough.

Seeding costs a few microseconds a sample (the previous code: 0.3-0.37 ms): only torch's CPU generator is seeded
(`torch.manual_seed` would also seed every CUDA generator of the process, slowly, and `fork_rng(devices=[])` does not
restore those), python's `random` and numpy's global state only when asked for (`rngs`), and the previous states are
saved and restored only in the main process (num_workers=0, or a direct `dataset[i]`), where they are the training
loop's (about 15 us there, 70 us more with numpy's); a worker's global RNG states belong to no one but the samples.
"""
import math
import random
from typing import Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from fcmae.runtime.signals import ignore_stop_signals

RNGS = ("torch", "random", "numpy")
MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: nearby inputs give unrelated 64-bit outputs."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for sample `index` of `epoch` of a run seeded with `seed` (distinct triples, distinct seeds
    except for 64-bit collisions). Not the scheme before fcmae/data/sampling.py existed: the same run seed now draws other
    crops and masks than runs (and checkpoints) made before it."""
    return _mix64(_mix64(_mix64(seed & MASK64) ^ (epoch & MASK64)) ^ (index & MASK64))


Index = Union[int, Tuple[int, int]]


class SeededDataset(Dataset):
    """`dataset[index]` with its augmentation seeded from (seed, epoch, index). Indexed by `(epoch, index)` (what
    EpochSampler yields) or by a plain `index` (then the epoch of the last `set_epoch`, 0 at first).

    `rngs`: the global generators the wrapped dataset's transform draws from, seeded per sample: "torch" (the CPU
    generator: torchvision transforms, masks), "random" (python's: timm's RandAugment, random erasing,
    RandomResizedCropAndInterpolation), "numpy" (numpy's legacy global: timm's RandAugment op choice).
    Wrappers such as Subset keep `.dataset`, so fcmae.data.bad_samples finds the image files inside."""

    def __init__(self, dataset, seed: int, rngs: Sequence[str] = RNGS):
        unknown = set(rngs) - set(RNGS)
        if unknown:
            raise ValueError(f"unknown rngs {sorted(unknown)}; choose from {RNGS}")
        self.dataset, self.seed, self.epoch = dataset, seed, 0
        self.rngs = tuple(r for r in RNGS if r in rngs)

    def set_epoch(self, epoch: int):
        """The epoch of plain-int indices (main process only: persistent workers never see it)."""
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index: Index):
        epoch, i = (int(v) for v in index) if isinstance(index, tuple) else (self.epoch, int(index))
        s = sample_seed(self.seed, epoch, i)
        restore = get_worker_info() is None  # in the main process the global states are the caller's
        saved = self._get_states() if restore else None
        torch.random.default_generator.manual_seed(s)  # CPU only: torch.manual_seed also seeds CUDA
        if "random" in self.rngs:
            random.seed(s)
        if "numpy" in self.rngs:
            np.random.seed(s & 0xFFFFFFFF)
        try:
            return self.dataset[i]
        finally:
            if restore:
                self._set_states(saved)

    def _get_states(self):
        return (torch.random.default_generator.get_state(),
                random.getstate() if "random" in self.rngs else None,
                np.random.get_state() if "numpy" in self.rngs else None)

    @staticmethod
    def _set_states(saved):
        torch_state, py_state, np_state = saved
        torch.random.default_generator.set_state(torch_state)
        if py_state is not None:
            random.setstate(py_state)
        if np_state is not None:
            np.random.set_state(np_state)


class EpochSampler(Sampler):
    """Shuffled order fixed by (seed, epoch), sharded by rank like DistributedSampler (padded to equal shards),
    starting at `start` (samples of this rank already consumed) when resuming mid-epoch.

    Yields `(epoch, index)` pairs, for SeededDataset; `indices()` is the plain index list of the epoch (without
    the start offset). Call `set_epoch(epoch, start)` before each `iter(loader)`."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if size < 1:
            raise ValueError(f"EpochSampler needs at least one sample, got size {size}")
        self.size, self.seed, self.shuffle, self.rank, self.world_size = size, seed, shuffle, rank, world_size
        self.num_samples = math.ceil(size / world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0):
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start {start} outside this rank's {self.num_samples} samples")
        self.epoch, self.start = epoch, start

    def indices(self):
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        else:
            order = torch.arange(self.size)
        total = self.num_samples * self.world_size
        if total > self.size:
            order = torch.cat([order, order[: total - self.size]])
        return order[self.rank:total:self.world_size].tolist()

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, i) for i in self.indices()[self.start:])

    def __len__(self):
        return self.num_samples - self.start


def make_loader(dataset, sampler: EpochSampler, batch_size: int, num_workers: int, pin_memory: bool = False,
                drop_last: bool = True, prefetch_factor: int = 4, collate_fn=None) -> DataLoader:
    """The run's one DataLoader: with workers they persist across epochs (no respawn, no re-import, warm
    decoders); `prefetch_factor` batches per worker in flight. Per epoch (or resume point):

        sampler.set_epoch(epoch, start=samples_done_in_epoch_by_this_rank)
        batches = iter(loader)   # the sampler's iterator is made here, in the main process

    A new `iter(loader)` while batches of the previous one are in flight discards those (DataLoader drains them),
    so breaking out of an epoch early (checkpoint, stop request) and starting again is safe. The workers ignore stop
    signals (fcmae.runtime.signals.ignore_stop_signals). `pin_memory`: True
    for CUDA training. The dataset must take the sampler's `(epoch, index)` items (SeededDataset)."""
    kwargs = dict(batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                  drop_last=drop_last)
    if collate_fn is not None:
        kwargs["collate_fn"] = collate_fn
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor, worker_init_fn=ignore_stop_signals)
    return DataLoader(dataset, **kwargs)


class EpochLoader:
    """A run's training batches: `dataset` seeded per sample (SeededDataset), its order fixed by (seed, epoch) and
    sharded by rank (EpochSampler), served by one DataLoader whose workers persist (make_loader).
    `epoch(epoch, start)` iterates the micro-batches of that epoch from sample `start` of this process's share;
    `collate_fn` as DataLoader's (None: its default)."""

    def __init__(self, dataset, *, seed: int, rank: int, world_size: int, batch_size: int, num_workers: int,
                 pin_memory: bool = False, rngs: Sequence[str] = RNGS, collate_fn=None):
        self.dataset = SeededDataset(dataset, seed=seed, rngs=rngs)
        self.sampler = EpochSampler(len(self.dataset), seed=seed, rank=rank, world_size=world_size)
        self.loader = make_loader(self.dataset, self.sampler, batch_size, num_workers, pin_memory=pin_memory,
                                  collate_fn=collate_fn)

    def epoch(self, epoch: int, start: int = 0):
        self.sampler.set_epoch(epoch, start=start)
        return iter(self.loader)
