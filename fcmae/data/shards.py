"""WebDataset tar shards with random access: `--data-path 'shards/train-{000000..000146}.tar'` or a folder of .tar
files, read like an image folder (same seeded order, DDP sharding, exact resume mid-epoch, bad-file handling).

Shards are named, listed and indexed in fcmae.data.shard_index (the layout: which members form a sample;
the cached index and how it is checked; what is not supported); this module reads their samples.

Labels are read but never trusted: a `.cls` must hold an integer 0 <= label < MAX_LABEL (else the sample's
target is BAD_LABEL; without one NO_LABEL). Pretraining ignores targets, so a bad label cannot stop it or make
it allocate a class list of 10**9 names; fine-tuning refuses bad, missing and out-of-classes.json labels
(`check_labels`, one line naming shard:member and what it holds) rather than skip them: a label is what the head
learns, and silently dropping or renumbering classes would train a different task. Class names come from a
`classes.json` (a list of names in label order, as make_shards writes it) next to the first shard when its length
fits, else they are "0", "1", ...

Damaged shards go through the bad-sample rules (fcmae.data.bad_samples), as damaged files do: a member whose
data is cut short fails when read; a shard that ends inside a member header, at a member boundary without tar's
end-of-archive marker, or at an unreadable header gets one extra bad entry, named `<shard>:<member name, or
<byte N>>`, that fails with the reason, so the loss is counted and logged and stops the run past
--max-bad-fraction. A file that is not a tar at all is refused (DataError).

Decoding is fcmae.data.decode.decode on the member's bytes, so a shard sample decodes exactly as the same file in a
folder; a member over twice MAX_DECODED_BYTES is bad without being read. Bad samples are skipped and counted
exactly as for folders (TarShards has fcmae.data.decode's bad-file protocol, so BadImageMonitor polls it), named
`<shard path>:<member name>`.
"""
import io
import json
import logging
import os
import re
from functools import cached_property
from typing import List, Optional

import numpy as np

from fcmae.runtime.errors import DataError

from . import decode as decoding
from .bad_samples import SkippingDataset
from .decode import decode, describe
from .locations import printable
from .shard_index import COLUMNS, SAMPLE_EXTENSIONS, is_shards, load_index, shard_paths

log = logging.getLogger("fcmae")

CLASSES_FILE = "classes.json"
MAX_OPEN_SHARDS = 64  # file descriptors kept open per process
MAX_LABEL = 2 ** 20  # labels at or above are refused: a head of a million classes is a mistake, not a data set
NO_LABEL, BAD_LABEL = -1, -2  # targets without a .cls, and with one that holds no label in 0..MAX_LABEL-1


def read_class_names(folder: str) -> Optional[List[str]]:
    """The names listed in the folder's classes.json, None without a readable list of strings."""
    try:
        with open(os.path.join(folder, CLASSES_FILE)) as f:
            names = json.load(f)
    except (OSError, ValueError):
        return None
    return names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def read_classes(folder: str, num_classes: int) -> List[str]:
    names = read_class_names(folder)
    return names if names is not None and len(names) == num_classes else [str(i) for i in range(num_classes)]


def parse_label(text: Optional[str]) -> int:
    """A .cls text as a target: the integer it holds when 0 <= label < MAX_LABEL, NO_LABEL for no .cls, else
    BAD_LABEL (never raises: pretraining reads no label)."""
    if text is None:
        return NO_LABEL
    text = text.strip()
    if not re.fullmatch(r"\+?\d{1,7}", text, re.ASCII):
        return BAD_LABEL
    label = int(text)
    return label if label < MAX_LABEL else BAD_LABEL


# ---------------------------------------------------------------- decoding


def decode_bytes(data: bytes, name: str, in_chans: int = 3, draft_side: Optional[int] = None):
    """One sample's bytes by fcmae.data.decode's rules (`decode`; the extension of `name` picks the reader), so a shard
    sample decodes exactly as the same file in a folder. Raises (any exception) when it cannot be decoded."""
    return decode(io.BytesIO(data), name, in_chans, draft_side=draft_side)


# ---------------------------------------------------------------- dataset


class TarShards(SkippingDataset):
    """(decoded image, label) for each sample of the shards of `data_path` (a brace pattern, a .tar file or a
    folder of .tar files), in shard order then tar order, plus one bad entry per damaged shard (after its
    samples); the transform, decoding, kind and bad-sample rules of fcmae.data.folders.ImageFiles, whose bad-file
    protocol it has (BadImageMonitor polls it): `input_size` allows reduced-scale JPEG decoding, `bad_image` and
    `max_bad_fraction` set when bad samples stop the run, `in_chans` the channels every sample must have.

    Attributes: `targets` (int64 array: the label, NO_LABEL without a .cls, BAD_LABEL for one that holds no
    label), `classes`, `class_to_idx`, `num_classes` (largest valid label + 1, 0 without labels), `shards`
    (paths), `kind` (EIGHT_BIT or HIGH_BIT_DEPTH: that of the first sample that loads; samples of the other kind
    are bad). `check_labels()` raises for labels fine-tuning cannot use."""

    def __init__(self, data_path: str, transform=None, input_size=None, bad_image: str = "skip",
                 max_bad_fraction: float = 0.01, in_chans: int = 3):
        self.shards = shard_paths(data_path)
        indexes = [load_index(s) for s in self.shards]
        self.damage = {i: index["damage"]["reason"] for i, index in enumerate(indexes) if index["damage"]}
        cols = [self._with_damage(index) for index in indexes]
        counts = [len(c["key"]) for c in cols]
        if sum(counts) - len(self.damage) == 0:
            raise DataError(f"no samples in the {len(self.shards)} shards of {data_path} (looked for members "
                            f"with extensions {', '.join(SAMPLE_EXTENSIONS)})")
        for shard, index in zip(self.shards, indexes):
            extra = index["extra_images"]
            if extra["count"]:
                log.warning("%s: %d image member%s not read, as %s: WebDataset's key ends at the first dot of the "
                            "file name, so images whose names differ only after it are one sample, of which the "
                            "first image is read", printable(shard), extra["count"],
                            "s were" if extra["count"] > 1 else " was", printable(str(extra["first"])))
        # numpy columns, not lists of python objects: forked workers would copy pages of refcounted objects
        self.shard_of = np.repeat(np.arange(len(self.shards), dtype=np.int32), counts)
        self.offsets = np.concatenate([np.asarray(c["offset"], dtype=np.int64) for c in cols])
        self.sizes = np.concatenate([np.asarray(c["size"], dtype=np.int64) for c in cols])
        self.targets = np.array([parse_label(t) for c in cols for t in c["cls"]], dtype=np.int64)
        self.keys = np.array([k.encode("utf-8", "surrogateescape") for c in cols for k in c["key"]], dtype=np.bytes_)
        self.ext_names = sorted({e for c in cols for e in c["ext"]})
        ext_id = {e: i for i, e in enumerate(self.ext_names)}
        self.ext_ids = np.array([ext_id[e] for c in cols for e in c["ext"]],
                                dtype=np.uint8 if len(self.ext_names) <= 256 else np.int32)
        self.num_classes = int(self.targets.max()) + 1 if self.targets.max() >= 0 else 0
        self.bad_labels = self._first_bad_labels(cols)

        self.root = os.path.commonpath([os.path.dirname(os.path.abspath(s)) for s in self.shards])
        self.where = f"the shards {data_path}"
        self.data_path, self.transform, self.in_chans = data_path, transform, in_chans
        self.draft_side = 2 * int(max(np.atleast_1d(input_size))) if input_size is not None else None
        self.bad_image, self.max_bad_fraction = bad_image, max_bad_fraction
        self._files, self._pid = {}, None
        self._count_bad()
        self.probe_kind()

    @staticmethod
    def _with_damage(index: dict) -> dict:
        """The index's columns, with a bad entry (offset -1) after the samples of a damaged shard."""
        cols, damage = index["samples"], index["damage"]
        if not damage:
            return cols
        return {c: cols[c] + [v] for c, v in zip(COLUMNS, (damage["name"], "", -1, 0, None))}

    def _first_bad_labels(self, cols, first: int = 2):
        """[(`<shard>:<key>.cls`, its text)] of the first samples whose .cls holds no label."""
        bad = np.flatnonzero(self.targets == BAD_LABEL)[:first].tolist()
        texts = [t for c in cols for t in c["cls"]] if bad else []
        return [(printable(f"{self.shards[self.shard_of[i]]}:{self.keys[i].decode('utf-8', 'surrogateescape')}.cls"),
                 texts[i]) for i in bad]

    @cached_property
    def classes(self) -> List[str]:  # on first use: pretraining never builds the list
        return read_classes(os.path.dirname(self.shards[0]), self.num_classes)

    @cached_property
    def class_to_idx(self) -> dict:
        return {name: i for i, name in enumerate(self.classes)}

    def check_labels(self):
        """DataError unless every sample has a label fine-tuning can use: an integer 0 <= label < MAX_LABEL, and
        under the length of classes.json where there is one. A bad label stops the run instead of being skipped as
        a bad sample: the label is what the head learns, and a silently dropped or renumbered class is a
        different task."""
        samples = self.offsets >= 0  # not the bad entries of damaged shards
        missing = np.flatnonzero(samples & (self.targets == NO_LABEL))
        if len(self.bad_labels):
            count = int((self.targets == BAD_LABEL).sum())
            named = ", ".join(f"{name} holds {printable(text.strip()[:24])!r}" for name, text in self.bad_labels)
            raise DataError(f"{self.where}: {count} sample{'s' * (count != 1)} {'have' if count != 1 else 'has'} a "
                            f".cls that is not a class index 0..{MAX_LABEL - 1} ({named}); fine-tuning does not "
                            "skip labels: fix them or leave those samples out")
        if len(missing):
            raise DataError(f"{self.where}: {len(missing)} sample{'s' * (len(missing) != 1)} "
                            f"{'have' if len(missing) != 1 else 'has'} no .cls label (first: "
                            f"{self.filename(int(missing[0]))})")
        names = read_class_names(os.path.dirname(self.shards[0]))
        if names is not None and self.num_classes > len(names):
            first = int(np.flatnonzero(self.targets >= len(names))[0])
            cls = printable(f"{self.shards[self.shard_of[first]]}:{self.keys[first].decode('utf-8', 'surrogateescape')}"
                            ".cls")
            raise DataError(f"{self.where}: {cls} holds label {self.targets[first]}, but {CLASSES_FILE} lists "
                            f"{len(names)} classes (labels 0..{len(names) - 1})")

    def keep_only(self, indices):
        """Restrict the dataset to these samples (in this order), its bad-sample count and limit with it."""
        indices = np.asarray(indices, dtype=np.int64)
        for name in ("shard_of", "offsets", "sizes", "targets", "keys", "ext_ids"):
            setattr(self, name, getattr(self, name)[indices])
        self._count_bad()

    def __len__(self):
        return len(self.offsets)

    def member(self, i: int) -> str:
        """The member name of sample i (undecodable bytes as surrogates); a damaged shard's bad entry: its name."""
        key, ext = self.keys[i].decode("utf-8", "surrogateescape"), self.ext_names[self.ext_ids[i]]
        return f"{key}.{ext}" if ext else key

    def filename(self, i: int) -> str:
        """`<shard path>:<member name>`, printable."""
        return printable(f"{self.shards[self.shard_of[i]]}:{self.member(i)}")

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: the parent's descriptors are not this process's to use
            self._files, self._pid = {}, os.getpid()
        fd = self._files.pop(shard, None)
        if fd is None:
            if len(self._files) >= MAX_OPEN_SHARDS:
                os.close(self._files.pop(next(iter(self._files))))  # least recently used
            fd = os.open(self.shards[shard], os.O_RDONLY)
        self._files[shard] = fd  # (re)inserted last: most recently used
        return fd

    def read_bytes(self, i: int) -> bytes:
        """Sample i's raw (encoded) bytes; raises for a damaged shard's bad entry, a member cut short and one
        too large to be an image (over twice MAX_DECODED_BYTES: an encoded image is at most about its decoded
        size, a TIFF's overviews adding a third), which is not read."""
        if self.offsets[i] < 0:
            raise ValueError(self.damage[int(self.shard_of[i])])
        size, limit = int(self.sizes[i]), 2 * decoding.MAX_DECODED_BYTES
        if size > limit:
            raise ValueError(f"a member of {size:,} bytes, over the limit of {limit:,} bytes for an encoded image "
                             "(twice fcmae.data.decode.MAX_DECODED_BYTES)")
        data = os.pread(self._fd(int(self.shard_of[i])), size, int(self.offsets[i]))
        if len(data) != size:
            raise OSError(f"the shard ends {size - len(data):,} bytes into this member's {size:,} (a copy cut short, "
                          "or changed since it was indexed?)")
        return data

    def load(self, i: int):
        """Sample i decoded (no transform); raises when it cannot be read."""
        return decode_bytes(self.read_bytes(i), self.member(i), self.in_chans, self.draft_side)

    def target(self, i: int) -> int:
        return int(self.targets[i])

    def reason(self, error: Exception, i: int) -> str:
        return "empty file" if int(self.sizes[i]) == 0 and self.offsets[i] >= 0 else describe(error, "")

    def close(self):
        if self._pid == os.getpid():
            for fd in self._files.values():
                os.close(fd)
        self._files = {}

    def __getstate__(self):  # pickled for spawned workers: descriptors stay behind
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, None
        return state


def open_dataset(data_path: str, **kwargs):
    """TarShards when --data-path names shards (is_shards), else the image folder (fcmae.data.folders.image_folder):
    the one call the CLIs need. kwargs: transform, input_size, bad_image, max_bad_fraction (and class_to_idx
    for folders only)."""
    if is_shards(data_path):
        kwargs.pop("class_to_idx", None)
        return TarShards(data_path, **kwargs)
    from .folders import image_folder

    return image_folder(data_path, **kwargs)
