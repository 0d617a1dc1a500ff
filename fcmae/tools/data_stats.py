"""Per-channel mean and std of a folder of images, for the CLIs' normalisation (their `-c` reads the output):

    python -m fcmae.tools.data_stats FOLDER --in-chans C [--out stats.yaml] [--max-images N] [--num-workers 2]
        [--bad-image skip|error] [--max-bad-fraction 0.01] [--seed 0]

Each file is decoded as training decodes it (fcmae/data/decode.py, `in_chans` channels), at full size and without
augmentation: 8-bit sources scaled to 0..1 (the ImageNet convention, as fcmae.data.normalization.normalize scales them), deeper
ones in their own units. One streaming pass: each image's per-channel pixel count, mean and sum of squared
deviations in float64, merged by Chan et al.'s pairwise formulas (no cancellation, even for 16-bit values). Every
pixel weighs the same (a large image counts more than a small one); std is the population std (numpy's, ddof 0).
--max-images N: a seeded random sample of N files. Bad files are skipped and counted as in training
(--bad-image, --max-bad-fraction), each named once on stderr. A progress line every few seconds.
Output: YAML `in-chans: C`, `mean: [...]`, `std: [...]` on stdout and in --out. Bad input: one `error:` line,
exit code 2.
"""
import logging
import os
import sys
import time
from typing import Optional

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from fcmae.data.decode import describe, kind_of
from fcmae.data.folders import ImageFiles
from fcmae.data.normalization import EIGHT_BIT
from fcmae.data.transforms import AsTensor
from fcmae.runtime.cli import check_writable_dir, run_cli
from fcmae.runtime.errors import DataError, UsageError
from fcmae.runtime.logs import setup_logging
from fcmae.runtime.options import ArgParser, Float, Int, Str, add, parse_with_config

FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest std normalisation can divide by
RELATIVE_SPREAD = 1e-6  # a std below this fraction of the mean is no spread (float32 images resolve about 6e-8)
log = logging.getLogger("fcmae")
PROGRESS_EVERY_S = 5.0
CHUNK_PIXELS = 2 ** 22  # pixels per float64 pass over a large image: 32 MB per channel


def image_moments(img):
    """(pixels per channel, per-channel mean (C,), per-channel sum of squared deviations (C,)), float64; 8-bit
    images scaled to 0..1. Large images go CHUNK_PIXELS at a time (merged as Moments merges images), so the
    float64 copy stays a few dozen MB per channel instead of 8 bytes per sample of the whole image."""
    x = AsTensor()(img).flatten(1)
    scale = 255 if kind_of(img) == EIGHT_BIT else None
    if x.shape[1] <= CHUNK_PIXELS:
        return _moments(x, scale)
    total = Moments(x.shape[0])
    for start in range(0, x.shape[1], CHUNK_PIXELS):
        total.add(*_moments(x[:, start:start + CHUNK_PIXELS], scale))
    return total.n, total.mean, total.m2


def _moments(x, scale):
    x = x.double()
    if scale:
        x /= scale
    mean = x.mean(dim=1)
    return x.shape[1], mean, ((x - mean[:, None]) ** 2).sum(dim=1)


class Moments:
    """Running per-channel count, mean and sum of squared deviations (Chan, Golub & LeVeque's merge)."""

    def __init__(self, channels: int):
        self.n, self.mean, self.m2 = 0, torch.zeros(channels, dtype=torch.float64), torch.zeros(channels,
                                                                                                dtype=torch.float64)

    def add(self, n: int, mean: torch.Tensor, m2: torch.Tensor):
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.n * n / total)
        self.n = total

    def std(self) -> torch.Tensor:
        return (self.m2 / self.n).sqrt()


class _ImageMoments(Dataset):
    """(file index, moments or None, reason or None) per file: decoded (and reduced) in loader workers."""

    def __init__(self, files: ImageFiles):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            img = self.files.load_checked(i)
        except Exception as e:
            return i, None, describe(e, self.files.filename(i))
        return i, image_moments(img), None


def channel_stats(folder: str, in_chans: int, max_images: Optional[int] = None, num_workers: int = 2,
                  bad_image: str = "skip", max_bad_fraction: float = 0.01, seed: int = 0) -> dict:
    """{"in-chans", "mean", "std", "images", "skipped", "kind"} over the folder's images (module docstring).
    DataError for a missing folder, one without images, or too many bad files."""
    files = ImageFiles(folder, in_chans=in_chans, bad_image=bad_image, max_bad_fraction=max_bad_fraction)
    if max_images is not None and max_images < len(files):
        files.keep_only(np.sort(np.random.default_rng(seed).choice(len(files), max_images, replace=False)))
    moments, skipped = Moments(in_chans), 0
    loader = DataLoader(_ImageMoments(files), batch_size=None, num_workers=num_workers)
    start = last = time.monotonic()
    for done, (i, stats, reason) in enumerate(loader, 1):
        if stats is None:
            files.bad[i] = 1
            skipped += 1
            if files.over_limit():
                raise files.limit_error()
            log.warning("skipped unreadable image %s: %s", files.filename(i), reason)
        else:
            moments.add(*stats)
        if time.monotonic() - last >= PROGRESS_EVERY_S or done == len(files):
            last = time.monotonic()
            log.info("%d/%d images (%.1f/s), %d skipped", done, len(files), done / max(last - start, 1e-9), skipped)
    return {"in-chans": in_chans, "mean": moments.mean.tolist(), "std": moments.std().tolist(),
            "images": len(files) - skipped, "skipped": skipped, "kind": files.kind}


def check_spread(folder: str, mean, std) -> None:
    """DataError for channels with no spread (constant images): their std is 0, or the float64 rounding noise of
    the sums (about 1e-17 of the mean), which no normalisation can divide by; so no YAML is printed or written."""
    flat = [c for c, (m, s) in enumerate(zip(mean, std)) if not s >= max(FLOAT32_TINY, RELATIVE_SPREAD * abs(m))]
    if flat:
        raise DataError(f"{folder}: channel{'s' * (len(flat) > 1)} {', '.join(map(str, flat))} of --in-chans "
                        f"{len(std)} {'have' if len(flat) > 1 else 'has'} the same value in every pixel of every image "
                        "read (std 0): no normalisation can divide by it, so no statistics were written; check the "
                        "images (or --in-chans)")


def to_yaml(stats: dict) -> str:
    """The YAML the CLIs' `-c` reads (in-chans, mean, std), after a comment line on where the numbers come from."""
    units = "scaled to 0..1" if stats["kind"] == EIGHT_BIT else "in their own units"
    head = f"# {stats['images']} {stats['kind']} images ({units}), {stats['skipped']} skipped\n"
    body = {k: stats[k] for k in ("in-chans", "mean", "std")}
    return head + yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=1000)


def build_parser() -> ArgParser:
    p = ArgParser(prog="python -m fcmae.tools.data_stats", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="folder of images (class subfolders or not), read as training reads it")
    add(p, "--in-chans", kind=Int(min=1, max=64), required=True, help="channels per image (files with others are bad)")
    add(p, "--out", kind=Str(optional=True), default=None, help="also write the YAML here")
    add(p, "--max-images", kind=Int(min=1), default=None, help="a seeded random sample of N files (default: all)")
    add(p, "--seed", kind=Int(min=0), default=0, help="picks the --max-images sample")
    add(p, "-j", "--num-workers", "--workers", kind=Int(min=0), default=2,
        help="decoding processes (0: the main process)")
    add(p, "--bad-image", kind=Str(["skip", "error"]), default="skip",
        help="an unreadable file: 'skip' it (counted) or 'error' (stop at the first)")
    add(p, "--max-bad-fraction", kind=Float(min=0, max=1), default=0.01, metavar="F",
        help="stop once more than this fraction of the files turned out unreadable")
    return p


def run(argv=None) -> dict:
    args = parse_with_config(build_parser(), argv)
    for name in ("in_chans", "max_images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.out:
        check_writable_dir(os.path.dirname(os.path.abspath(args.out)))
    setup_logging()
    stats = channel_stats(args.folder, args.in_chans, args.max_images, args.num_workers, args.bad_image,
                          args.max_bad_fraction, args.seed)
    check_spread(args.folder, stats["mean"], stats["std"])
    text = to_yaml(stats)
    print(text, end="")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return stats


def main(argv=None):
    sys.exit(run_cli(run, argv))


if __name__ == "__main__":
    main()
