"""Tar shards named, listed and indexed (fcmae.data.shards reads their samples): --data-path as a brace pattern,
a .tar file or a folder of them; each shard's samples found once from its tar headers and cached.

Layout (WebDataset's): consecutive tar members sharing a key form a sample, the key being the member name up to
the first dot of its last path component (`n01440764/img_10026.jpg` -> key `n01440764/img_10026`, extension
`jpg`; `v1.2.shot0.png` -> key `v1`, extension `2.shot0.png`). A sample's image is its first member whose
extension ends in an image extension (fcmae.data.decode.IMAGE_EXTENSIONS, .npy included, any case: WebDataset's
decoders too go by the last part), its label the text of its optional `.cls` member. Further image members of a
sample are not read: a warning counts them per shard (two files `v1.2.shot0.png`, `v1.2.shot1.png` are one
sample to WebDataset; make_shards replaces such dots). Other members are ignored, as are keys without an image.
Member names need not be UTF-8 (kept as bytes, printed escaped).

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

from .decode import IMAGE_EXTENSIONS
from .locations import MAGIC, compressed_message, printable, unsupported

log = logging.getLogger("fcmae")

SAMPLE_EXTENSIONS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # .npy included
INDEX_SUFFIX = ".idx.json"
INDEX_FORMAT, INDEX_VERSION = "fcmae-shard-index", 2  # 2: .cls text (not parsed), damage, extra images
COLUMNS = ("key", "ext", "offset", "size", "cls")
BLOCK = tarfile.BLOCKSIZE
CLS_CHARS = 32  # a longer .cls holds no class index: only its start is kept, to name it
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
