"""Per-channel normalisation. Images have `in_chans` channels (fcmae/data/decode.py decodes files); the pretraining
transform leaves them unnormalised, uint8 for 8-bit sources and float32 in native units for deeper ones, and
`normalize` runs on the batch on the device: uint8 divided by 255, minus the per-channel mean, over the std.
`resolve_mean_std` checks the per-channel lists and supplies the defaults for 8-bit sources (ImageNet's for RGB).
"""
import math
from typing import Optional, Sequence, Tuple

import torch

from fcmae.runtime.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN = (0.449,)  # the average of ImageNet's R, G, B values: the default for 8-bit grey (in_chans 1)
GREY_STD = (0.226,)
EIGHT_BIT, HIGH_BIT_DEPTH = "8-bit", "high-bit-depth"  # the two kinds of decoded image (fcmae.data.decode.kind_of)


def resolve_mean_std(in_chans: int, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                     kind: Optional[str] = None) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The per-channel (mean, std) for `in_chans` channels: the given lists, checked (one finite value per channel,
    std > 0), or with both None the defaults for 8-bit sources scaled to 0..1: ImageNet's for 3 channels, GREY_MEAN
    and GREY_STD for 1. UsageError for a wrong length or value, one list without the other, or no lists where there
    is no default: other channel counts, or `kind` HIGH_BIT_DEPTH (a dataset's `kind`: values in their own units).
    Call it with kind=None before anything runs, and again with the dataset's kind once it is open."""
    if in_chans < 1:
        raise UsageError(f"--in-chans must be >= 1, got {in_chans}")
    if mean is None and std is None:
        how = f"compute them with `python -m fcmae.tools.data_stats FOLDER --in-chans {in_chans}`"
        if kind == HIGH_BIT_DEPTH:
            raise UsageError(f"the images hold 16-bit or float values in their own units, for which there is no "
                             f"default normalisation: pass --mean and --std ({in_chans} values each; {how})")
        if in_chans not in (1, 3):
            raise UsageError(f"--in-chans {in_chans} has no default normalisation: pass --mean and --std "
                             f"({in_chans} values each; {how})")
        return (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else (GREY_MEAN, GREY_STD)
    if mean is None or std is None:
        raise UsageError(f"pass both --mean and --std, not only --{'std' if mean is None else 'mean'}")
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    for name, values in (("--mean", mean), ("--std", std)):
        if len(values) != in_chans:
            raise UsageError(f"{name} has {len(values)} value{'s' * (len(values) != 1)} but --in-chans is {in_chans}: "
                             "give one per channel")
        if not all(math.isfinite(v) for v in values):
            raise UsageError(f"{name} values must be finite, got {list(values)}")
    if min(std) <= 0:
        raise UsageError(f"--std values must be > 0, got {list(std)}")
    check_float32(mean, std)
    return mean, std


def check_float32(mean: Sequence[float], std: Sequence[float]):
    """Normalisation runs in float32 ((x - mean) / std): a mean or std beyond float32's range becomes inf, a std
    below its smallest normal number loses its precision or becomes 0 (what float64 accepts, e.g. --std 1e-300,
    would end as a non-finite loss)."""
    for name, values in (("--mean", mean), ("--std", std)):
        as32 = torch.tensor(values, dtype=torch.float64).to(torch.float32)
        if not torch.isfinite(as32).all():
            raise UsageError(f"{name} {list(values)}: beyond float32's range (|value| < 3.4e38), in which images are "
                             "normalised")
    tiny = torch.finfo(torch.float32).tiny  # 1 / tiny is still finite in float32
    small = [v for v in std if v < tiny]
    if small:
        raise UsageError(f"--std {list(std)}: {small[0]:g} is below float32's smallest normal number ({tiny:g}), in "
                         "which images are normalised; a channel with no spread cannot be normalised (see "
                         "python -m fcmae.tools.data_stats)")


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Images (C, H, W) or (N, C, H, W), uint8 or float, to float32 (x - mean) / std per channel, uint8 first
    divided by 255: for 8-bit RGB bit for bit what ToTensor() + Normalize(mean, std) gave. On any device: meant for
    the batch once it is on the accelerator (the loader then moves uint8, a quarter of the bytes)."""
    y = x.to(torch.float32, copy=True)  # one new buffer, then in place: 4x faster on a CPU than a chain of new ones
    if x.dtype == torch.uint8:
        y.div_(255)
    mean = torch.as_tensor(mean, dtype=y.dtype, device=y.device).reshape(-1, 1, 1)
    std = torch.as_tensor(std, dtype=y.dtype, device=y.device).reshape(-1, 1, 1)
    return y.sub_(mean).div_(std)
