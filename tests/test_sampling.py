"""fcmae/data/sampling.py: per-sample seeding that is a function of (seed, epoch, index) and leaves the caller's RNGs
alone (CUDA's included), and one persistent DataLoader serving every epoch and mid-epoch resumes exactly as fresh
loaders would."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from fcmae.data.sampling import EpochSampler, SeededDataset, make_loader, sample_seed
from fcmae.data.transforms import pretrain_transform
from fcmae.pretrain.data import MaskedImages


class Photos(torch.utils.data.Dataset):
    """Small random RGB images, labelled with their index."""

    def __init__(self, n=24, transform=None):
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 255, (40 + i % 5, 48, 3), dtype=np.uint8)) for i in range(n)]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), i


def pretrain_set(seed=3):
    return SeededDataset(MaskedImages(Photos(transform=pretrain_transform((32, 32))), 4, 0.5), seed=seed,
                         rngs=("torch",))


def batches(loader):
    return [(x.clone(), m.clone()) for x, m in loader]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(m, n) for (x, m), (y, n) in zip(a, b))


def test_sample_is_a_function_of_seed_epoch_index_only():
    ds = pretrain_set()
    first = ds[(2, 5)][0]
    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(2)
    torch.rand(7)
    assert torch.equal(ds[(2, 5)][0], first)  # global RNG states do not matter
    ds.set_epoch(2)
    assert torch.equal(ds[5][0], first)  # a plain index takes the epoch of set_epoch
    assert not torch.equal(ds[(3, 5)][0], first)  # another epoch: another crop
    assert not torch.equal(pretrain_set(seed=4)[(2, 5)][0], first)  # another run seed
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(50) for i in range(200)}
    assert len(seeds) == 3 * 50 * 200


def test_main_process_rng_states_are_restored_and_cuda_is_not_seeded(monkeypatch):
    seeded_cuda = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded_cuda.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", seeded_cuda.append)
    ds = SeededDataset(MaskedImages(Photos(4, transform=pretrain_transform((32, 32))), 4, 0.5), seed=0)

    def draws(use_dataset):
        torch.random.default_generator.manual_seed(7)
        random.seed(7)
        np.random.seed(7)
        if use_dataset:
            ds[1], ds[(4, 2)]
        return torch.rand(3), random.random(), np.random.rand()

    expected, got = draws(False), draws(True)
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    assert seeded_cuda == []  # torch.manual_seed would seed (and initialise) every CUDA generator


def test_rngs_are_seeded_per_sample_where_asked():
    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(1).item(), random.random(), np.random.rand()

    all_three = SeededDataset(Draws(), seed=1)
    assert all_three[(0, 1)] == all_three[(0, 1)] and all_three[(0, 1)] != all_three[(0, 2)]
    torch_only = SeededDataset(Draws(), seed=1, rngs=("torch",))
    a, b = torch_only[(0, 1)], torch_only[(0, 1)]
    assert a[0] == b[0] and a[1:] != b[1:]  # python and numpy draws were not seeded
    with pytest.raises(ValueError, match="unknown rngs"):
        SeededDataset(Draws(), seed=1, rngs=("cuda",))


def test_sampler_order_shards_and_start():
    s = EpochSampler(10, seed=5)
    s.set_epoch(3)
    order = s.indices()
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(5 * 7919 + 3)).tolist()
    assert order == expected  # the order of the previous implementation (fcmae.data): old runs resume the same
    assert list(s) == [(3, i) for i in order]
    s.set_epoch(3, start=4)
    assert list(s) == [(3, i) for i in order[4:]] and len(s) == 6
    ranks = [EpochSampler(10, seed=5, rank=r, world_size=3) for r in range(3)]
    for r in ranks:
        r.set_epoch(3)
    assert sorted(i for r in ranks for i in r.indices()) == sorted(order + order[:2])  # padded to 3 x 4
    with pytest.raises(ValueError, match="start"):
        s.set_epoch(0, start=11)


@pytest.mark.parametrize("workers", [2])
def test_persistent_loader_equals_fresh_loaders_across_epochs_and_mid_epoch(workers):
    """Two epochs through one persistent loader with workers = fresh 0-worker loaders per epoch; a start offset
    gives the tail of the epoch; a mid-epoch break then a new epoch is clean."""
    def fresh(epoch, start=0):
        ds = pretrain_set()
        sampler = EpochSampler(len(ds), seed=3)
        sampler.set_epoch(epoch, start)
        return batches(make_loader(ds, sampler, 4, num_workers=0))

    expected = {e: fresh(e) for e in (0, 1)}
    assert not torch.equal(expected[0][0][0], expected[1][0][0])
    ds = pretrain_set()
    sampler = EpochSampler(len(ds), seed=3)
    loader = make_loader(ds, sampler, 4, num_workers=workers, prefetch_factor=2)
    assert loader.persistent_workers
    got = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        got[epoch] = batches(loader)
    workers_seen = loader._iterator._workers
    assert same(got[0], expected[0]) and same(got[1], expected[1])
    sampler.set_epoch(1, start=8)  # resume after 2 batches of 4
    assert same(batches(loader), expected[1][2:])
    sampler.set_epoch(0)  # break out after one batch (prefetched batches in flight), then another epoch
    it = iter(loader)
    assert same([next(it)], expected[0][:1])
    sampler.set_epoch(1)
    assert same(batches(loader), expected[1])
    assert loader._iterator._workers is workers_seen  # the same worker processes throughout
