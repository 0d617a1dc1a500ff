"""WebDataset tar shards with random access: `--data-path 'shards/train-{000000..000146}.tar'` or a folder of .tar
files, read like an image folder (same seeded order, DDP sharding, exact resume mid-epoch, bad-file handling).

Layout (WebDataset's): consecutive tar members sharing a key form a sample, the key being the member name up to
the first dot of its last path component (`n01440764/img_10026.jpg` -> key `n01440764/img_10026`, extension
`jpg`; `v1.2.shot0.png` -> key `v1`, extension `2.shot0.png`). A sample's image is its first member whose
extension ends in an image extension (fcmae.data.decode.IMAGE_EXTENSIONS, .npy included, any case: WebDataset's
decoders too go by the last part), its label the text of its optional `.cls` member. Further image members of a
sample are not read: a warning counts them per shard (two files `v1.2.shot0.png`, `v1.2.shot1.png` are one
sample to WebDataset; make_shards replaces such dots). Other members are ignored, as are keys without an image.
Member names need not be UTF-8 (kept as bytes, printed escaped). Class names come from a `classes.json` (a list
of names in label order, as make_shards writes it) next to the first shard when its length fits, else they are
"0", "1", ...

Labels are read but never trusted: a `.cls` must hold an integer 0 <= label < MAX_LABEL (else the sample's
target is BAD_LABEL; without one NO_LABEL). Pretraining ignores targets, so a bad label cannot stop it or make
it allocate a class list of 10**9 names; fine-tuning refuses bad, missing and out-of-classes.json labels
(`check_labels`, one line naming shard:member and what it holds) rather than skip them: a label is what the head
learns, and silently dropping or renumbering classes would train a different task.

Damaged shards go through the bad-sample rules (fcmae.data.bad_samples), as damaged files do: a member whose
data is cut short fails when read; a shard that ends inside a member header, at a member boundary without tar's
end-of-archive marker, or at an unreadable header gets one extra bad entry, named `<shard>:<member name, or
<byte N>>`, that fails with the reason, so the loss is counted and logged and stops the run past
--max-bad-fraction. A file that is not a tar at all is refused (DataError).

Index: each shard's samples as columns key/ext/offset/size/cls (the `.cls` text, at most CLS_CHARS characters;
null without one) plus its damage, found by reading the tar headers once (tarfile, seeking over the data) and
cached next to the shard as `<shard>.idx.json`; reused while the shard's size and mtime are those recorded and
what it claims holds up: its columns are complete and consistent, offsets ascend within the file, and the tar
headers at a few recorded offsets name the recorded members and sizes (CHECKED_HEADERS reads: an edited shard
whose mtime was kept, or a stale or hand-made index, is rebuilt with a warning instead of being served). Where
the shard's folder is not writable the index goes to $FCMAE_CACHE_DIR (default ~/.cache/fcmae/shard-index),
under a name derived from the shard's absolute path. make_shards also writes a dataset description for
webdataset's `wids` (`<prefix>-shardindex.json`, wids_version 1: the shards' relative urls and sample counts).
Why not read through `wids`: it needs that JSON anyway, copies shards into a cache folder, brings a dependency,
and its samples are dicts of raw bytes; an index of offsets is a few dozen lines, and reading a sample is one
`os.pread` on a file descriptor opened lazily in each process (fork-safe: a forked worker opens its own, as the
owning pid is checked).

Decoding is fcmae.data.decode.decode on the member's bytes, so a shard sample decodes exactly as the same file in a
folder; a member over twice MAX_DECODED_BYTES is bad without being read. Bad samples are skipped and counted
exactly as for folders (TarShards has fcmae.data.decode's bad-file protocol, so BadImageMonitor polls it), named
`<shard path>:<member name>`.

Not supported, refused with a message saying what is (`unsupported`): URLs (http(s)://, s3://, gs://, pipe:,
...) and compressed shards (.tar.gz, .tgz, .tar.zst, ...; also compressed data named .tar). Only local
uncompressed tar files are read (a FUSE mount such as s3fs, gcsfuse or `rclone mount` is a local path): a sample
is one read at a recorded offset, which needs an uncompressed, seekable file. Native remote support would need
range reads per sample (HTTP Range / S3 GetObject with a byte range, e.g. through fsspec with a block cache) on
one client per worker process, the `.idx.json` files published with the shards (scanning remote headers is one
request per member), and the cache check done on the ETag instead of size and mtime. Per-sample range requests
are slow at ImageNet rates: copying the shards to local disk first (they are a few large sequential files) is the
practical path.
"""
import io
import json
import logging
import os
import re
import tarfile
from functools import cached_property
from hashlib import sha1
from typing import List, Optional

import numpy as np

from fcmae.runtime.errors import DataError
from fcmae.runtime.files import atomic_write

from . import decode as decoding
from .bad_samples import SkippingDataset
from .decode import IMAGE_EXTENSIONS, decode, describe
from .locations import MAGIC, compressed_message, printable, unsupported

log = logging.getLogger("fcmae")

SAMPLE_EXTENSIONS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # .npy included
INDEX_SUFFIX = ".idx.json"
INDEX_FORMAT, INDEX_VERSION = "fcmae-shard-index", 2  # 2: .cls text (not parsed), damage, extra images
COLUMNS = ("key", "ext", "offset", "size", "cls")
CLASSES_FILE = "classes.json"
MAX_OPEN_SHARDS = 64  # file descriptors kept open per process
BLOCK = tarfile.BLOCKSIZE
CLS_CHARS = 32  # a longer .cls holds no class index: only its start is kept, to name it
MAX_LABEL = 2 ** 20  # labels at or above are refused: a head of a million classes is a mistake, not a data set
NO_LABEL, BAD_LABEL = -1, -2  # targets without a .cls, and with one that holds no label in 0..MAX_LABEL-1
CHECKED_HEADERS = 8  # tar headers read to check a cached index before it is served

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
    top level) rather than a folder of images; also a URL or compressed shards, which shard_paths refuses."""
    if "{" in data_path or data_path.endswith(".tar") or unsupported(data_path):
        return True
    return os.path.isdir(data_path) and any(e.name.endswith(".tar") and e.is_file() for e in os.scandir(data_path))


def shard_paths(data_path: str) -> List[str]:
    """The shard files of --data-path, in order (a folder: its .tar files sorted by name); DataError when none,
    some are missing, or they are not supported (`unsupported`)."""
    why = unsupported(data_path)
    if why:
        raise DataError(why)
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


def is_image(ext: str) -> bool:
    """Whether a member of this extension is an image: by its last part, as WebDataset's decoders go."""
    return ext.rpartition(".")[2].lower() in SAMPLE_EXTENSIONS


def _read_cls(fd: int, member: tarfile.TarInfo) -> str:
    """The start of a .cls member's text (CLS_CHARS; a longer or cut-short one is marked so it parses as no
    label)."""
    data = os.pread(fd, min(member.size, CLS_CHARS), member.offset_data)
    text = data.decode("utf-8", "replace")
    if member.size > CLS_CHARS:
        return text + "..."
    return text if len(data) == member.size else text + "...(cut short)"


def _end_damage(fd: int, offset: int, size: int) -> Optional[dict]:
    """What ends the shard at `offset`, where tarfile found no further member: None for tar's end-of-archive
    marker (a zero block), else the damage (a shard cut short, or a broken header)."""
    block = os.pread(fd, BLOCK, offset)
    if len(block) == BLOCK and not block.strip(b"\0"):
        return None
    if not block:
        reason = (f"the shard ends at byte {offset:,} without tar's end-of-archive marker (a copy cut short?); "
                  "members after this point are missing")
        return {"name": f"<byte {offset}>", "offset": offset, "reason": reason}
    name = block[:100].split(b"\0")[0].decode("utf-8", "surrogateescape") if len(block) >= 100 else ""
    if len(block) < BLOCK:
        reason = (f"the shard ends inside a tar header at byte {offset:,} of {size:,} (a copy cut short?); this "
                  "member and any after it are missing")
    else:
        reason = (f"an unreadable tar header at byte {offset:,} (a damaged shard?); this member and the rest of the "
                  "shard are not read")
    return {"name": name or f"<byte {offset}>", "offset": offset, "reason": reason}


def _compression(path: str) -> Optional[str]:
    with open(path, "rb") as f:
        head = f.read(8)
    return next((kind for magic, kind in MAGIC.items() if head.startswith(magic)), None)


def scan_shard(path: str) -> dict:
    """The shard's index fields: its samples (columns, lists), its damage (None or {name, offset, reason}) and its
    image members beyond each sample's first ({count, first}), read from its tar headers."""
    cols = {c: [] for c in COLUMNS}
    extra = {"count": 0, "first": None}
    current, image, label = None, None, None

    def flush():
        if current is not None and image is not None:
            for col, value in zip(COLUMNS, (current,) + image + (label,)):
                cols[col].append(value)

    size = os.path.getsize(path)
    compression = _compression(path)
    if compression:
        raise DataError(compressed_message(path, compression))
    fd = os.open(path, os.O_RDONLY)
    try:
        tar = tarfile.open(path, "r:")
    except (tarfile.TarError, EOFError) as e:
        os.close(fd)
        raise DataError(f"{path} is not a readable tar file: {e}") from None
    damage = None
    with tar:
        try:
            while True:
                try:
                    member = tar.next()
                except (tarfile.TarError, EOFError):  # a member's data cut short, or a header cut after an extension
                    damage = _cut_member(tar, fd, size)
                    break
                if member is None:
                    damage = _end_damage(fd, tar.offset, size)
                    break
                if not member.isfile():
                    continue
                key, ext = split_name(member.name)
                if key != current:
                    flush()
                    current, image, label = key, None, None
                if is_image(ext):
                    if image is None:
                        image = (ext, member.offset_data, member.size)
                    else:
                        extra["count"] += 1
                        extra["first"] = extra["first"] or member.name
                elif ext.lower() == "cls":
                    label = _read_cls(fd, member)
            flush()
        finally:
            os.close(fd)
    return {"samples": cols, "damage": damage, "extra_images": extra}


def _cut_member(tar: tarfile.TarFile, fd: int, size: int) -> Optional[dict]:
    """The damage where tarfile stopped with an error: the shard ends inside the last member's data (that member
    itself fails when read if it is a sample's image: no extra entry) or inside a header."""
    last = tar.members[-1] if tar.members else None
    if last is not None and tar.offset > size:  # the last member's data or padding is cut
        if is_image(split_name(last.name)[1]) and last.offset_data + last.size > size:
            return None
        reason = (f"the shard ends at byte {size:,}, inside member {printable(last.name)} (a copy cut short?); members "
                  "after it are missing")
        return {"name": last.name, "offset": last.offset, "reason": reason}
    return _end_damage(fd, tar.offset, size) or {
        "name": f"<byte {tar.offset}>", "offset": tar.offset,
        "reason": f"an unreadable tar header at byte {tar.offset:,}; the rest of the shard is not read"}


def index_path(shard: str) -> str:
    return shard + INDEX_SUFFIX


def _cache_path(shard: str) -> str:
    root = os.environ.get("FCMAE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fcmae",
                                                              "shard-index")
    name = sha1(os.fsencode(os.path.abspath(shard))).hexdigest()[:16] + "-" + os.path.basename(shard) + INDEX_SUFFIX
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


def _all(values, kind) -> bool:
    return all(isinstance(v, kind) and not isinstance(v, bool) for v in values)


def index_problem(index: dict, shard: str) -> Optional[str]:
    """What is wrong with a cached index whose stamp matches `shard`, checked cheaply (None: nothing found): its
    columns (complete, consistent, of the right types), its offsets (ascending, inside the file) and the tar
    headers at up to CHECKED_HEADERS recorded offsets (the recorded member name and size)."""
    samples, size = index.get("samples"), index.get("size")
    if not isinstance(samples, dict) or any(not isinstance(samples.get(c), list) for c in COLUMNS):
        return "a column is missing"
    n = len(samples["key"])
    if any(len(samples[c]) != n for c in COLUMNS):
        return "its columns differ in length"
    if not (_all(samples["key"], str) and _all(samples["ext"], str) and _all(samples["offset"], int)
            and _all(samples["size"], int) and all(v is None or isinstance(v, str) for v in samples["cls"])):
        return "a column holds values of the wrong type"
    damage, extra = index.get("damage"), index.get("extra_images")
    if not (damage is None or isinstance(damage, dict) and isinstance(damage.get("name"), str)
            and isinstance(damage.get("reason"), str)) or not (
            isinstance(extra, dict) and isinstance(extra.get("count"), int)):
        return "its damage or extra-image record is malformed"
    if n == 0:
        return None
    offsets, sizes = np.asarray(samples["offset"], dtype=np.int64), np.asarray(samples["size"], dtype=np.int64)
    if offsets[0] < BLOCK or (np.diff(offsets) <= 0).any() or offsets[-1] > size or (sizes < 0).any():
        return "its offsets are not ascending within the file"
    fd = os.open(shard, os.O_RDONLY)
    try:
        for i in sorted(set(np.linspace(0, n - 1, CHECKED_HEADERS).round().astype(int).tolist())):
            name = samples["key"][i] + "." + samples["ext"][i]
            try:
                header = tarfile.TarInfo.frombuf(os.pread(fd, BLOCK, int(offsets[i]) - BLOCK), "utf-8",
                                                 "surrogateescape")
            except tarfile.TarError:
                return f"no tar header before the data of {printable(name)}"
            # a long or non-ASCII name lives in an extended header before this one: there only the size is checked
            if header.size != sizes[i] or (name.isascii() and len(name) <= 100 and header.name != name):
                return f"the tar header at its offset for {printable(name)} names {printable(header.name)}"
    finally:
        os.close(fd)
    return None


def _write_json(path: str, obj: dict):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # atomic: ranks indexing at once, or a kill mid-write, leave a whole file
    atomic_write(path, lambda f: json.dump(obj, f, separators=(",", ":")), binary=False)


def load_index(shard: str, rebuild: bool = False) -> dict:
    """The shard's index, from its cache when the shard did not change (size, mtime) and the cache holds up
    (index_problem), else scanned and cached."""
    stamp = _stamp(shard)
    if not rebuild:
        for path in (index_path(shard), _cache_path(shard)):
            index = _read_index(path, stamp)
            if index is None:
                continue
            problem = index_problem(index, shard)
            if problem is None:
                return index
            log.warning("the index %s does not match its shard (%s); rebuilding it", printable(path), problem)
    index = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "shard": os.path.basename(shard), **stamp,
             **scan_shard(shard)}
    for path in (index_path(shard), _cache_path(shard)):
        try:
            _write_json(path, index)
            break
        except OSError:
            continue
    else:
        log.warning("could not cache the index of %s (its folder and %s are not writable); it is rebuilt per run",
                    printable(shard), os.path.dirname(_cache_path(shard)))
    return index


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
