"""WebDataset tar shards with random access: `--data-path 'shards/train-{000000..000146}.tar'` or a folder of .tar
files, read like an image folder (same seeded order, DDP sharding, exact resume mid-epoch, bad-file handling).

Layout (WebDataset's): consecutive tar members sharing a key form a sample, the key being the member name up to
the first dot of its last path component (`n01440764/img_10026.jpg` -> key `n01440764/img_10026`, extension
`jpg`). A sample's image is its first member with an image extension (fcmae.data.decode.IMAGE_EXTENSIONS, .npy
included, any case), its label the integer in its optional `.cls` member (-1 without one). Other members are
ignored, as are keys without an image. Class names come from a `classes.json` (a list of names in label order, as
tools/make_shards writes it) next to the first shard when its length fits, else they are "0", "1", ...

Index: each shard's samples as (key, extension, data offset, size, label), found by reading the tar headers once
(tarfile, seeking over the data) and cached next to the shard as `<shard>.idx.json`; reused while the shard's size
and mtime are those recorded, rebuilt otherwise. Where the shard's folder is not writable the index goes to
$FCMAE_CACHE_DIR (default ~/.cache/fcmae/shard-index), under a name derived from the shard's absolute path.
Why not webdataset's `wids`: it needs a JSON shard list with sample counts and its own index files anyway, brings
a dependency, and its samples are dicts of raw bytes; an index of offsets is a few dozen lines, and reading a
sample is one `os.pread` on a file descriptor opened lazily in each process (fork-safe: a forked worker opens
its own, as the owning pid is checked).

Decoding is fcmae.data.decode.decode on the member's bytes, so a shard sample decodes exactly as the same file in a
folder. Bad samples are skipped and counted exactly as for folders (TarShards has fcmae.data.decode's bad-file protocol,
so BadImageMonitor polls it), named `<shard path>:<member name>`.

Shard URLs (http, s3, gs): not supported; only local paths (a FUSE mount such as s3fs, gcsfuse or `rclone mount`
is a local path). Native support would need range reads per sample (HTTP Range / S3 GetObject with a byte range,
e.g. through fsspec with a block cache) on one client per worker process, the `.idx.json` files published with
the shards (scanning remote headers is one request per member), and the cache check done on the ETag instead of
size and mtime. Per-sample range requests are slow at ImageNet rates: copying the shards to local disk first
(they are a few large sequential files) is the practical path.
"""
import io
import json
import logging
import os
import re
import tarfile
from hashlib import sha1
from typing import List, Optional

import numpy as np

from fcmae.runtime.errors import DataError
from fcmae.runtime.files import atomic_write

from .bad_samples import SkippingDataset
from .decode import IMAGE_EXTENSIONS, decode, describe

log = logging.getLogger("fcmae")

SAMPLE_EXTENSIONS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # .npy included
INDEX_SUFFIX = ".idx.json"
INDEX_FORMAT, INDEX_VERSION = "fcmae-shard-index", 1
CLASSES_FILE = "classes.json"
MAX_OPEN_SHARDS = 64  # file descriptors kept open per process


# ---------------------------------------------------------------- shard lists


def expand_braces(pattern: str) -> List[str]:
    """WebDataset/bash brace expansion: `{000000..000146}` (zero padding kept from the first bound) and
    `{a,b,c}`, several groups allowed: 'train-{0..1}-{a,b}.tar' -> 4 names in that order."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        if hi < lo:
            raise DataError(f"empty range {{{body}}} in {pattern}")
        width = len(r.group(1))
        items = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise DataError(f"cannot expand {{{body}}} in {pattern}: use {{000..099}} or {{a,b}}")
    return [name for item in items for name in expand_braces(head + item + tail)]


def is_shards(data_path: str) -> bool:
    """Whether --data-path names tar shards (a brace pattern, a .tar file, or a folder with .tar files at its
    top level) rather than a folder of images."""
    if "{" in data_path or data_path.endswith(".tar"):
        return True
    return os.path.isdir(data_path) and any(e.name.endswith(".tar") and e.is_file() for e in os.scandir(data_path))


def shard_paths(data_path: str) -> List[str]:
    """The shard files of --data-path, in order (a folder: its .tar files sorted by name); DataError when none
    or some are missing."""
    if os.path.isdir(data_path):
        paths = sorted(os.path.join(data_path, e.name) for e in os.scandir(data_path)
                       if e.name.endswith(".tar") and e.is_file())
        if not paths:
            raise DataError(f"no .tar shards in {data_path}")
        return paths
    paths = expand_braces(data_path)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(f"{len(missing)} of {len(paths)} shards of {data_path} not found: "
                        f"{', '.join(missing[:3])}{more}")
    return paths


# ---------------------------------------------------------------- index


def split_name(name: str):
    """(key, extension) of a tar member, WebDataset's rule: the key ends at the first dot of the last component."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (folder + "/" if folder else "") + stem, ext if dot else ""


def scan_shard(path: str) -> dict:
    """The shard's samples, columns key/ext/offset/size/label (lists), read from its tar headers."""
    cols = {"key": [], "ext": [], "offset": [], "size": [], "label": []}
    current, image, label = None, None, -1

    def flush():
        if current is not None and image is not None:
            for col, value in zip(("key", "ext", "offset", "size"), (current,) + image):
                cols[col].append(value)
            cols["label"].append(label)

    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_name(member.name)
                if key != current:
                    flush()
                    current, image, label = key, None, -1
                ext = ext.lower()
                if ext in SAMPLE_EXTENSIONS and image is None:
                    image = (ext, member.offset_data, member.size)
                elif ext == "cls":
                    text = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                    try:
                        label = int(text)
                    except ValueError:
                        raise DataError(f"{path}: {member.name} holds {text[:40]!r}, not an integer class "
                                        "label") from None
            flush()
    except (tarfile.TarError, EOFError) as e:
        raise DataError(f"{path} is not a readable tar file: {e}") from None
    return cols


def index_path(shard: str) -> str:
    return shard + INDEX_SUFFIX


def _cache_path(shard: str) -> str:
    root = os.environ.get("FCMAE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fcmae",
                                                              "shard-index")
    name = sha1(os.path.abspath(shard).encode()).hexdigest()[:16] + "-" + os.path.basename(shard) + INDEX_SUFFIX
    return os.path.join(root, name)


def _stamp(shard: str) -> dict:
    st = os.stat(shard)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_index(path: str, stamp: dict) -> Optional[dict]:
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError):
        return None
    if (not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or index.get("version") != INDEX_VERSION
            or any(index.get(k) != v for k, v in stamp.items())):
        return None
    return index


def _write_json(path: str, obj: dict):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # atomic: ranks indexing at once, or a kill mid-write, leave a whole file
    atomic_write(path, lambda f: json.dump(obj, f, separators=(",", ":")), binary=False)


def load_index(shard: str, rebuild: bool = False) -> dict:
    """The shard's index, from its cache when the shard did not change (size, mtime), else scanned and cached."""
    stamp = _stamp(shard)
    if not rebuild:
        for path in (index_path(shard), _cache_path(shard)):
            index = _read_index(path, stamp)
            if index is not None:
                return index
    index = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "shard": os.path.basename(shard), **stamp,
             "samples": scan_shard(shard)}
    for path in (index_path(shard), _cache_path(shard)):
        try:
            _write_json(path, index)
            break
        except OSError:
            continue
    else:
        log.warning("could not cache the index of %s (its folder and %s are not writable); it is rebuilt per run",
                    shard, os.path.dirname(_cache_path(shard)))
    return index


def read_classes(folder: str, num_classes: int) -> List[str]:
    try:
        with open(os.path.join(folder, CLASSES_FILE)) as f:
            names = json.load(f)
    except (OSError, ValueError):
        names = None
    if isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names):
        return names
    return [str(i) for i in range(num_classes)]


# ---------------------------------------------------------------- decoding


def decode_bytes(data: bytes, name: str, in_chans: int = 3, draft_side: Optional[int] = None):
    """One sample's bytes by fcmae.data.decode's rules (`decode`; the extension of `name` picks the reader), so a shard
    sample decodes exactly as the same file in a folder. Raises (any exception) when it cannot be decoded."""
    return decode(io.BytesIO(data), name, in_chans, draft_side=draft_side)


# ---------------------------------------------------------------- dataset


class TarShards(SkippingDataset):
    """(decoded image, label or -1) for each sample of the shards of `data_path` (a brace pattern, a .tar file or
    a folder of .tar files), in shard order then tar order; the transform, decoding, kind and bad-sample rules of
    fcmae.data.folders.ImageFiles, whose bad-file protocol it has (BadImageMonitor polls it): `input_size` allows
    reduced-scale JPEG decoding, `bad_image` and `max_bad_fraction` set when bad samples stop the run, `in_chans`
    the channels every sample must have.

    Attributes: `targets` (int64 array, -1 where a sample has no .cls), `classes`, `class_to_idx`,
    `num_classes` (max label + 1, 0 without labels), `shards` (paths), `kind` (EIGHT_BIT or HIGH_BIT_DEPTH: that
    of the first sample that loads; samples of the other kind are bad)."""

    def __init__(self, data_path: str, transform=None, input_size=None, bad_image: str = "skip",
                 max_bad_fraction: float = 0.01, in_chans: int = 3):
        self.shards = shard_paths(data_path)
        cols = [load_index(s)["samples"] for s in self.shards]
        counts = [len(c["key"]) for c in cols]
        if sum(counts) == 0:
            raise DataError(f"no samples in the {len(self.shards)} shards of {data_path} (looked for members "
                            f"with extensions {', '.join(SAMPLE_EXTENSIONS)})")
        # numpy columns, not lists of python objects: forked workers would copy pages of refcounted objects
        self.shard_of = np.repeat(np.arange(len(self.shards), dtype=np.int32), counts)
        self.offsets = np.concatenate([np.asarray(c["offset"], dtype=np.int64) for c in cols])
        self.sizes = np.concatenate([np.asarray(c["size"], dtype=np.int64) for c in cols])
        self.targets = np.concatenate([np.asarray(c["label"], dtype=np.int64) for c in cols])
        self.keys = np.array([k.encode() for c in cols for k in c["key"]], dtype=np.bytes_)
        self.ext_names = sorted({e for c in cols for e in c["ext"]})
        ext_id = {e: i for i, e in enumerate(self.ext_names)}
        self.ext_ids = np.array([ext_id[e] for c in cols for e in c["ext"]], dtype=np.uint8)
        self.num_classes = int(self.targets.max()) + 1 if self.targets.max() >= 0 else 0
        self.classes = read_classes(os.path.dirname(self.shards[0]), self.num_classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

        self.root = os.path.commonpath([os.path.dirname(os.path.abspath(s)) for s in self.shards])
        self.where = f"the shards {data_path}"
        self.data_path, self.transform, self.in_chans = data_path, transform, in_chans
        self.draft_side = 2 * int(max(np.atleast_1d(input_size))) if input_size is not None else None
        self.bad_image, self.max_bad_fraction = bad_image, max_bad_fraction
        self._files, self._pid = {}, None
        self._count_bad()
        self.probe_kind()

    def keep_only(self, indices):
        """Restrict the dataset to these samples (in this order), its bad-sample count and limit with it."""
        indices = np.asarray(indices, dtype=np.int64)
        for name in ("shard_of", "offsets", "sizes", "targets", "keys", "ext_ids"):
            setattr(self, name, getattr(self, name)[indices])
        self._count_bad()

    def __len__(self):
        return len(self.offsets)

    def member(self, i: int) -> str:
        return f"{self.keys[i].decode()}.{self.ext_names[self.ext_ids[i]]}"

    def filename(self, i: int) -> str:
        """`<shard path>:<member name>`."""
        return f"{self.shards[self.shard_of[i]]}:{self.member(i)}"

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
        size = int(self.sizes[i])
        data = os.pread(self._fd(int(self.shard_of[i])), size, int(self.offsets[i]))
        if len(data) != size:
            raise OSError(f"shard ends {size - len(data)} bytes early (changed since it was indexed?)")
        return data

    def load(self, i: int):
        """Sample i decoded (no transform); raises when it cannot be read."""
        return decode_bytes(self.read_bytes(i), self.member(i), self.in_chans, self.draft_side)

    def target(self, i: int) -> int:
        return int(self.targets[i])

    def reason(self, error: Exception, i: int) -> str:
        return "empty file" if int(self.sizes[i]) == 0 else describe(error, "")

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

