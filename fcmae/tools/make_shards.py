"""Pack an image folder into WebDataset tar shards for `--data-path 'OUT/train-{000000..000146}.tar'`.

    python -m fcmae.tools.make_shards FOLDER OUT [--shard-size 1GB] [--prefix train] [--overwrite]

Files are listed as the folder dataset lists them (fcmae.images: timm's reader, natural-sorted, the same
extensions, .npy included), so shard sample i is folder sample i and the seeded order is the same. With class
subfolders each sample gets a `<key>.cls` member (the class index in sorted class order) and OUT/classes.json lists
the class names in label order; a flat folder gives unlabelled samples. Files are stored as they are (no
re-encoding; unreadable ones are skipped at training time as in a folder). A sample's key is its path relative to
FOLDER without the extension, dots in the file name replaced by '_' (WebDataset's key ends at the first dot),
made unique with a suffix where that collides. Shards are written whole (a temporary name, then renamed), each
with its index (<shard>.idx.json, fcmae/shards.py), members in a fixed order with fixed metadata, so the same
folder gives the same bytes. Sizes: bytes, or with a unit: 500MB, 1GB, 1.5GiB (KB/MB/GB/TB powers of 1000, KiB/...
powers of 1024). Bad input: one `error:` line, exit code 2.
"""
import io
import json
import os
import re
import sys
import tarfile
import time

from timm.data.readers.reader_image_folder import find_images_and_targets

from fcmae.data.decode import IMAGE_EXTENSIONS
from fcmae.data.shards import CLASSES_FILE, load_index
from fcmae.runtime.cli import run_cli
from fcmae.runtime.errors import DataError, UsageError
from fcmae.runtime.options import ArgParser, Str, add, parse_with_config

UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12, "kib": 2 ** 10, "mib": 2 ** 20,
         "gib": 2 ** 30, "tib": 2 ** 40, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12}
BLOCK = 512


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
    samples, class_to_idx = find_images_and_targets(folder, types=IMAGE_EXTENSIONS)
    if not samples:
        raise DataError(f"no images found in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    if set(class_to_idx) == {""}:  # a flat folder
        return [(path, -1) for path, _ in samples], []
    if "" in class_to_idx:
        raise DataError(f"{folder} has images both at its top level and in class subfolders; use one layout")
    return samples, sorted(class_to_idx, key=class_to_idx.get)


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
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"OUT {out} is a file, not a folder")
    pattern = re.compile(re.escape(prefix) + r"-\d{6}\.tar(\.idx\.json)?$")
    existing = sorted(f for f in os.listdir(out) if pattern.match(f)) if os.path.isdir(out) else []
    if existing and not overwrite:
        raise UsageError(f"{out} already holds {prefix}-*.tar shards ({existing[0]}, ...); remove them, choose "
                         "another --prefix, or pass --overwrite")
    os.makedirs(out, exist_ok=True)
    for f in existing:
        os.remove(os.path.join(out, f))
    if classes:
        with open(os.path.join(out, CLASSES_FILE), "w") as f:
            json.dump(classes, f, indent=0)
    keys = sample_keys(folder, [p for p, _ in samples])
    shards, shard, tar, written, done, t0 = [], None, None, 0, 0, time.time()

    def close():
        tar.close()
        os.replace(shard + ".tmp", shard)
        load_index(shard, rebuild=True)  # the index, from the headers just written (in the page cache)
        mb = (sum(os.path.getsize(s) for s in shards)) / 1e6
        progress(f"{os.path.basename(shard)}: {os.path.getsize(shard) / 1e6:,.1f} MB; {done:,}/{len(samples):,} "
                 f"images ({100 * done / len(samples):.0f}%), {mb / max(time.time() - t0, 1e-9):,.1f} MB/s")

    for (path, label), key in zip(samples, keys):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror}") from None
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        cls = str(label).encode() if label >= 0 else None
        need = _member_bytes(len(data)) + (_member_bytes(len(cls)) if cls else 0) + 2 * BLOCK  # + pax slack
        if tar is not None and written + need + tarfile.RECORDSIZE > shard_size:  # + the end-of-archive padding
            close()
            tar = None
        if tar is None:
            shard = os.path.join(out, f"{prefix}-{len(shards):06d}.tar")
            shards.append(shard)
            tar = tarfile.open(shard + ".tmp", "w", format=tarfile.PAX_FORMAT)
            written = 0
        tar.addfile(_info(f"{key}.{ext}", len(data)), io.BytesIO(data))
        if cls:
            tar.addfile(_info(f"{key}.cls", len(cls)), io.BytesIO(cls))
        written = tar.offset
        done += 1
    close()
    data_path = os.path.join(out, f"{prefix}-{{{0:06d}..{len(shards) - 1:06d}}}.tar")
    return {"shards": shards, "samples": len(samples), "classes": classes, "data_path": data_path}


def build_parser() -> ArgParser:
    p = ArgParser(prog="python -m fcmae.tools.make_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="image folder (class subfolders give labels)")
    p.add_argument("out", help="output folder for the shards, their indexes and classes.json")
    add(p, "--shard-size", kind=Str(), default="1GB", help="largest shard size: bytes or e.g. 500MB, 1GB (default 1GB)")
    add(p, "--prefix", kind=Str(), default="train", help="shard name prefix: PREFIX-000000.tar, ...")
    add(p, "--overwrite", action="store_true", help="replace existing PREFIX-*.tar shards in OUT")
    return p


def run(argv=None) -> dict:
    args = parse_with_config(build_parser(), argv)
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
