"""Bad samples: an unreadable file (or tar member) is skipped, counted and logged instead of stopping or silently
thinning a days-long run.

Unreadable files: empty, truncated, not an image, an unsupported format, removed after listing, over the pixel
limit, a channel count other than in_chans ("4 channels, expected 3 (--in-chans)"), NaN or inf pixel values
("non-finite pixel values"), and in a folder whose first readable file is 8-bit a high-bit-depth one or the reverse
(the two are scaled differently, so one normalisation cannot fit both). Each is replaced by the next index
(cyclically) that loads, so what a sample index yields stays a function of the index alone and the seeded order
and exact resume hold. Each is marked in a shared-memory tensor, which DataLoader worker processes write and the
main process reads: `BadImageMonitor.poll()` logs each newly marked file once with its reason and raises DataError
once there are more than --max-bad-fraction of them (or, with --bad-image error, at the first). Past that limit a
worker of a monitored dataset returns a stand-in of the dataset's kind (`ImageFiles.stand_in`), so it does not die
with a traceback, and the poll before the next step stops the run before that batch is used; unmonitored, the
worker raises. In the main process the dataset raises the DataError itself.

The bad-file protocol BadImageMonitor relies on (duck-typed: ImageFiles has it, a tar-shard dataset may too):
- `bad`: a uint8 tensor of one entry per sample in shared memory (`.share_memory_()`), 1 where a sample failed;
- `allowed`: how many bad samples the run tolerates;
- `monitored`: a bool attribute the monitor sets to True (workers then return stand-ins past the limit);
- `filename(i) -> str`, `problem(i) -> str` (the reason, found again in the main process);
- `over_limit() -> bool`, `limit_error() -> DataError`.
The monitor finds such datasets inside wrappers that keep `.dataset` (Subset, SeededDataset, MaskedImages) or
`.datasets` (ConcatDataset).
"""
import logging
import math
import os
from typing import Optional

import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from fcmae.runtime.errors import DataError

from .decode import MEAN_GREY, MEAN_RGB, Decoded, kind_of
from .normalization import HIGH_BIT_DEPTH

log = logging.getLogger("fcmae")


class SkippingDataset(Dataset):
    """What a dataset of files (or of tar members) needs to skip bad ones by the module's rules: the shared-memory
    `bad` marks, the limit, the next-that-loads replacement, the kind check and the messages. A subclass sets
    `in_chans`, `draft_side`, `bad_image`, `max_bad_fraction`, `root` and `where` (named in errors), calls
    `_count_bad()` and `probe_kind()`, and supplies __len__, `load(i)`, `filename(i)`, `target(i)` and
    `reason(error, i)`."""

    kind: Optional[str] = None  # EIGHT_BIT or HIGH_BIT_DEPTH once probed (probe_kind); None: not known
    kind_file: Optional[str] = None
    monitored = False  # set by BadImageMonitor: someone polls the marks in the main process
    transform = None

    def probe_kind(self, tries: int = 100):
        """Set `kind` and `kind_file` from the first of the first `tries` samples that loads. Called once, in the
        constructor, so that every worker process has the same."""
        for i in range(min(tries, len(self))):
            try:
                self.kind, self.kind_file = kind_of(self.load(i)), self.filename(i)
                return
            except Exception:
                continue

    def _count_bad(self):
        # a run tolerates this many bad files; never all of them (there would be nothing to train on)
        allowed = 0 if self.bad_image == "error" else math.floor(self.max_bad_fraction * len(self) + 1e-9)
        self.allowed = min(allowed, len(self) - 1)
        # 1 = unreadable; in shared memory, so marks made in DataLoader workers reach the main process
        self.bad = torch.zeros(len(self), dtype=torch.uint8).share_memory_()

    def load_checked(self, i: int) -> Decoded:
        """`load`, and a sample of the other kind than the first (8-bit vs high-bit-depth) is unreadable too."""
        img = self.load(i)
        if self.kind is not None and kind_of(img) != self.kind:
            source = os.path.relpath(self.kind_file, self.root)
            raise ValueError(f"{kind_of(img)} values, but the first image {source} is {self.kind} (8-bit values are "
                             "scaled to 0..1, deeper ones kept in their units: one data set holds one kind)")
        return img

    def stand_in(self) -> Decoded:
        """A mean-valued 32x32 image of the dataset's kind, returned past the limit (so batches still collate)."""
        c = self.in_chans
        if self.kind == HIGH_BIT_DEPTH:
            return torch.zeros(c, 32, 32)
        if c in (1, 3):
            return Image.new("L", (32, 32), MEAN_GREY) if c == 1 else Image.new("RGB", (32, 32), MEAN_RGB)
        return torch.zeros(c, 32, 32, dtype=torch.uint8)

    def __getitem__(self, index):
        i = index
        while True:  # ends: once every file has failed, over_limit() holds
            try:
                img = self.load_checked(i)
                break
            except Exception:
                self.bad[i] = 1
                if self.over_limit():
                    if get_worker_info() is None or not self.monitored:  # unmonitored: a worker traceback, but a stop
                        raise self.limit_error() from None
                    img, i = self.stand_in(), index  # poll() stops the run
                    break
                i = (i + 1) % len(self)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.target(i)

    def bad_indices(self):
        return torch.nonzero(self.bad).flatten().tolist()

    def over_limit(self) -> bool:
        return int(self.bad.sum()) > self.allowed

    def problem(self, i: int) -> str:
        """Why sample `i` does not load, found by reading it again (in the main process)."""
        try:
            self.load_checked(i)
        except Exception as e:
            return self.reason(e, i)
        return "failed in a loader process but reads now (a passing I/O error?)"

    def limit_error(self) -> DataError:
        bad = self.bad_indices()
        if self.bad_image == "error":
            return DataError(f"unreadable image {self.filename(bad[0])}: {self.problem(bad[0])} (--bad-image error "
                             "stops at the first; --bad-image skip skips up to --max-bad-fraction of them)")
        named = [f"{os.path.relpath(self.filename(i), self.root)} ({self.problem(i)})" for i in bad[:3]]
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        why = "none can be read" if len(bad) == len(self) else f"over --max-bad-fraction {self.max_bad_fraction:g}"
        return DataError(f"{len(bad)} of {len(self)} images in {self.where} are unreadable ({why}); first: "
                         f"{', '.join(named)}{more}; remove or fix them, or raise --max-bad-fraction")


BAD_FILE_PROTOCOL = ("bad", "allowed", "monitored", "filename", "problem", "over_limit", "limit_error")


def _bad_file_sets(dataset):
    """The datasets with the bad-file protocol inside `dataset` and its wrappers (`.dataset`, `.datasets`)."""
    if all(hasattr(dataset, name) for name in BAD_FILE_PROTOCOL):
        yield dataset
    elif hasattr(dataset, "datasets"):
        for inner in dataset.datasets:
            yield from _bad_file_sets(inner)
    elif hasattr(dataset, "dataset"):
        yield from _bad_file_sets(dataset.dataset)


class BadImageMonitor:
    """Main-process report of the bad files that any process met in the given datasets: those with the bad-file
    protocol (module docstring), found inside wrappers; others are ignored (in-memory sets such as Fashion-MNIST
    cannot have bad files). Create it before the DataLoaders, call `poll()` once per optimiser step (and after an
    evaluation)."""

    def __init__(self, *datasets):
        self.files = []
        for files in (f for d in datasets for f in _bad_file_sets(d)):
            if all(files is not seen for seen in self.files):
                self.files.append(files)
        self.logged = [set() for _ in self.files]
        for files in self.files:
            files.monitored = True

    def poll(self):
        for files, logged in zip(self.files, self.logged):
            if int(files.bad.sum()) == len(logged):  # nothing new: the common case, one pass over a byte per file
                continue
            if files.over_limit():
                raise files.limit_error()
            for i in torch.nonzero(files.bad).flatten().tolist():
                if i not in logged:
                    logged.add(i)
                    log.warning("skipped unreadable image %s: %s (%d so far; the run stops at %d)",
                                files.filename(i), files.problem(i), len(logged), files.allowed + 1)
