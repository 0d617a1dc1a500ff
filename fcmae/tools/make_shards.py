"""Pack an image folder into WebDataset tar shards for `--data-path 'OUT/train-{000000..000146}.tar'`.

    python -m fcmae.tools.make_shards FOLDER OUT [--shard-size 1GB] [--prefix train] [--overwrite]

Files are listed as the folder dataset lists them (fcmae.data.folders.find_images: timm's order, the same
extensions, .npy included; folder links that loop back into the tree and files that are not regular, such as a
FIFO, left out with a warning), so shard sample i is folder sample i and the seeded order is the same. With class
subfolders each sample gets a `<key>.cls` member (the class index in sorted class order) and OUT/classes.json lists
the class names in label order; a flat folder gives unlabelled samples. Files are stored as they are (no
re-encoding, copied in chunks; unreadable ones are skipped at training time as in a folder). A sample's key is
its path relative to FOLDER without the extension, dots in the file name replaced by '_' (WebDataset's key ends at
the first dot), made unique with a suffix where that collides. Members are written in a fixed order with fixed
metadata, so the same folder gives the same bytes. Sizes: bytes, or with a unit: 500MB, 1GB, 1.5GiB (KB/MB/GB/TB
powers of 1000, KiB/... powers of 1024).

Output: PREFIX-000000.tar, ... each with its index (<shard>.idx.json, fcmae/data/shards.py), classes.json, and
PREFIX-shardindex.json, a dataset description for webdataset's `wids` (wids_version 1: each shard's url relative
to OUT, nsamples and filesize; wids reads member names from the plain tar header only, so keys over about 95
characters or with non-ASCII characters are read by wids differently). Everything is written into a temporary
folder inside OUT and moved into place at the end: a failure or Ctrl-C leaves OUT as it was (with --overwrite, the
previous shards stay until the new ones are complete). OUT must be new, empty, or hold only earlier outputs of
make_shards: other files there are refused, and so is a classes.json that lists other classes, unless it is that
of the shards --overwrite replaces. Bad input: one `error:` line, exit code 2; a failed write (a full disk): one
line, exit code 4.
"""
import io
import json
import os
import re
import shutil
import sys
import tarfile
import time

from fcmae.data.decode import IMAGE_EXTENSIONS, open_file
from fcmae.data.folders import find_images
from fcmae.data.shard_index import load_index
from fcmae.data.shards import CLASSES_FILE, read_class_names
from fcmae.runtime.cli import run_cli
from fcmae.runtime.errors import EXIT_WRITE_FAILED, DataError, RunStopped, UsageError
from fcmae.runtime.files import write_text
from fcmae.runtime.logs import setup_logging
from fcmae.runtime.options import ArgParser, Str, add, parse_with_config

UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12, "kib": 2 ** 10, "mib": 2 ** 20,
         "gib": 2 ** 30, "tib": 2 ** 40, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12}
BLOCK = 512
OUTPUT_FILE = re.compile(r"(?P<prefix>[A-Za-z0-9_.-]+)-(\d{6}\.tar(\.idx\.json)?|shardindex\.json)")
TEMPORARY = re.compile(r"\.[A-Za-z0-9_.-]+\.make_shards\.tmp")  # a killed run's leftover: replaced, not refused
WIDS_INDEX = "{prefix}-shardindex.json"


def parse_size(text: str) -> int:
    """'500MB' -> 500_000_000, '1GiB' -> 2**30, '123' -> 123 bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in UNITS:
        raise UsageError(f"--shard-size {text!r}: expected bytes or a size such as 500MB, 1GB, 2GiB")
    size = int(float(m.group(1)) * UNITS[m.group(2).lower()])
    if size < 2 * tarfile.RECORDSIZE:
        raise UsageError(f"--shard-size {text!r} is too small (at least {2 * tarfile.RECORDSIZE} bytes)")
    return size


def list_folder(folder: str):
    """[(path, label or -1)], class names: the folder dataset's listing (labels -1 without class subfolders)."""
    if not os.path.isdir(folder):
        raise DataError(f"data folder not found: {folder}")
    samples, class_to_idx = find_images(folder)
    if not samples:
        raise DataError(f"no images found in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    if set(class_to_idx) == {""}:  # a flat folder
        return [(path, -1) for path, _ in samples], []
    if "" in class_to_idx:
        raise DataError(f"{folder} has images both at its top level and in class subfolders; use one layout")
    return samples, sorted(class_to_idx, key=class_to_idx.get)


def _names(names, first: int = 3) -> str:
    return ", ".join(names[:first]) + (f" and {len(names) - first} more" if len(names) > first else "")


def plan_output(out: str, prefix: str, classes, overwrite: bool) -> dict:
    """What writing PREFIX's shards into OUT replaces, checked before anything is written: {"old": the earlier
    PREFIX files, "classes": "write", "keep" or "remove" for classes.json}. UsageError for an OUT that is a file,
    holds files make_shards did not write, holds PREFIX's shards without --overwrite, or holds a classes.json of
    other classes that is not that of the shards being replaced."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"OUT {out} is a file, not a folder")
    names = sorted(os.listdir(out)) if os.path.isdir(out) else []
    foreign = [n for n in names if not (OUTPUT_FILE.fullmatch(n) or TEMPORARY.fullmatch(n) or n == CLASSES_FILE)]
    if foreign:
        raise UsageError(f"OUT {out} holds files make_shards did not write ({_names(foreign)}); give a new or empty "
                         "folder, or one that holds only earlier make_shards output")
    outputs = [(n, OUTPUT_FILE.fullmatch(n)["prefix"]) for n in names if OUTPUT_FILE.fullmatch(n)]
    old = [n for n, p in outputs if p == prefix]
    others = sorted({p for _, p in outputs if p != prefix})
    if old and not overwrite:
        raise UsageError(f"{out} already holds {prefix}-*.tar shards ({old[0]}, ...); remove them, choose "
                         "another --prefix, or pass --overwrite")
    if CLASSES_FILE not in names:
        return {"old": old, "classes": "write" if classes else "keep"}
    if read_class_names(out) == classes:
        return {"old": old, "classes": "keep"}
    if not classes:  # unlabelled shards ignore classes.json: remove it only with the shards it was written for
        return {"old": old, "classes": "remove" if old and not others else "keep"}
    if old and not others:
        return {"old": old, "classes": "write"}
    whose = f"the shards of prefix {', '.join(others)}" if others else "no shards there"
    raise UsageError(f"{out}/{CLASSES_FILE} lists other classes than the {len(classes)} of this folder "
                     f"({_names(classes)}) and belongs to {whose}; shards in one folder share one {CLASSES_FILE}: "
                     "choose another OUT" + ("" if others else f", or remove that {CLASSES_FILE}"))


def sample_keys(folder: str, paths):
    """Unique WebDataset keys: the relative path without extension, dots in the file name replaced by '_'."""
    keys, seen = [], set()
    for path in paths:
        rel = os.path.relpath(path, folder).replace(os.sep, "/")
        head, _, base = rel.rpartition("/")
        stem = os.path.splitext(base)[0].replace(".", "_")
        key = (head + "/" if head else "") + stem
        candidate, n = key, 1
        while candidate in seen:
            candidate, n = f"{key}_{n}", n + 1
        seen.add(candidate)
        keys.append(candidate)
    return keys


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info


def _member_bytes(size: int) -> int:
    return BLOCK + -(-size // BLOCK) * BLOCK


def make_shards(folder: str, out: str, shard_size: int, prefix: str = "train", overwrite: bool = False,
                progress=print) -> dict:
    """Write the shards; returns {"shards": [paths], "samples": n, "classes": [names], "data_path": pattern}."""
    samples, classes = list_folder(folder)
    plan = plan_output(out, prefix, classes, overwrite)
    keys = sample_keys(folder, [p for p, _ in samples])
    created = not os.path.isdir(out)
    tmp = os.path.join(out, f".{prefix}.make_shards.tmp")
    try:
        os.makedirs(out, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a killed run's leftover
        os.mkdir(tmp)
        names = _write_shards(samples, keys, classes, tmp, prefix, shard_size, plan["classes"] == "write", progress)
        for name in names:  # the new output moved into place, then the earlier one's remainder removed
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
        for name in set(plan["old"]) - set(names):
            os.remove(os.path.join(out, name))
        if plan["classes"] == "remove":
            os.remove(os.path.join(out, CLASSES_FILE))
        os.rmdir(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(e, OSError):
            raise RunStopped(f"cannot write the shards in {out}: {e.strerror or e}; "
                             + ("nothing was written" if created else f"{out} is left as it was"),
                             EXIT_WRITE_FAILED) from None
        raise
    shards = [os.path.join(out, n) for n in names if n.endswith(".tar")]
    data_path = os.path.join(out, f"{prefix}-{{{0:06d}..{len(shards) - 1:06d}}}.tar")
    return {"shards": shards, "samples": len(samples), "classes": classes, "data_path": data_path}


def _write_shards(samples, keys, classes, tmp: str, prefix: str, shard_size: int, write_classes: bool,
                  progress) -> list:
    """The shards, their indexes, the wids description and (`write_classes`) classes.json, written into `tmp`;
    returns their names in the order they are to be moved into place."""
    names, wids, shard, tar, written, done, t0 = [], [], None, None, 0, 0, time.time()

    def close():
        tar.close()
        index = load_index(shard, rebuild=True)  # the index, from the headers just written (in the page cache)
        names.extend([os.path.basename(shard), os.path.basename(shard) + ".idx.json"])
        wids.append({"url": os.path.basename(shard), "nsamples": len(index["samples"]["key"]),
                     "filesize": os.path.getsize(shard)})
        mb = sum(w["filesize"] for w in wids) / 1e6
        progress(f"{os.path.basename(shard)}: {os.path.getsize(shard) / 1e6:,.1f} MB; {done:,}/{len(samples):,} "
                 f"images ({100 * done / len(samples):.0f}%), {mb / max(time.time() - t0, 1e-9):,.1f} MB/s")

    for (path, label), key in zip(samples, keys):
        try:
            f = open_file(path)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            ext = os.path.splitext(path)[1].lower().lstrip(".")
            cls = str(label).encode() if label >= 0 else None
            need = _member_bytes(size) + (_member_bytes(len(cls)) if cls else 0) + 2 * BLOCK  # + pax slack
            if tar is not None and written + need + tarfile.RECORDSIZE > shard_size:  # + end-of-archive padding
                close()
                tar = None
            if tar is None:
                shard = os.path.join(tmp, f"{prefix}-{len(wids):06d}.tar")
                tar = tarfile.open(shard, "w", format=tarfile.PAX_FORMAT)
                written = 0
            tar.addfile(_info(f"{key}.{ext}", size), f)  # copied in chunks: a huge file is not read into memory
        if cls:
            tar.addfile(_info(f"{key}.cls", len(cls)), io.BytesIO(cls))
        written = tar.offset
        done += 1
    close()
    wids_name = WIDS_INDEX.format(prefix=prefix)
    write_text(os.path.join(tmp, wids_name), json.dumps({"__kind__": "wids-shard-index-v1", "wids_version": 1,
                                                         "name": prefix, "shardlist": wids}, indent=1))
    names.append(wids_name)
    if write_classes:
        with open(os.path.join(tmp, CLASSES_FILE), "w") as f:
            json.dump(classes, f, indent=0)
        names.append(CLASSES_FILE)
    return names


def build_parser() -> ArgParser:
    p = ArgParser(prog="python -m fcmae.tools.make_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="image folder (class subfolders give labels)")
    p.add_argument("out", help="output folder for the shards, their indexes and classes.json")
    add(p, "--shard-size", kind=Str(), default="1GB", help="largest shard size: bytes or e.g. 500MB, 1GB (default 1GB)")
    add(p, "--prefix", kind=Str(), default="train", help="shard name prefix: PREFIX-000000.tar, ...")
    add(p, "--overwrite", action="store_true",
        help="replace existing PREFIX-*.tar shards in OUT (kept until the new ones are complete)")
    return p


def run(argv=None) -> dict:
    args = parse_with_config(build_parser(), argv)
    setup_logging()
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.prefix):
        raise UsageError(f"--prefix {args.prefix!r}: use letters, digits, '_', '.' and '-'")
    result = make_shards(args.folder, args.out, parse_size(args.shard_size), args.prefix, args.overwrite,
                         progress=lambda line: print(line, flush=True))
    n = len(result["classes"])
    labels = f", {n} class{'es' * (n != 1)}" if n else ", no labels"
    print(f"wrote {result['samples']:,} images{labels} in {len(result['shards'])} shards; train with "
          f"--data-path '{result['data_path']}'")
    return result


def main(argv=None):
    sys.exit(run_cli(run, argv))


if __name__ == "__main__":
    main()
