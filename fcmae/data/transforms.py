"""Transforms of both stages, unnormalised where the batch is normalised on the device (pretraining) and with
Normalize where timm's pipeline ends in it (fine-tuning).

Pretraining: the reference FCMAE augmentation on any channel count (`pretrain_transform`).
Fine-tuning, by channel count (`in_chans`) and source (fcmae/data/decode.py decodes files):
- 8-bit RGB (PIL images): timm's pipeline, as the reference recipe: train RandomResizedCrop + flip + RandAugment
  (`aa`) + ToTensor + Normalize + random erasing, bicubic, colour jitter only when asked for (timm 1.0 adds
  ColorJitter(0.4) without RandAugment, the reference had none); eval resize to input / 0.875 + centre crop, and
  at inputs of 384 and more a plain resize to the input size (the reference's squash, no crop);
- any other channel count, and high-bit-depth RGB (float32 tensors): the same geometry on tensors, no colour ops:
  train RandomResizedCrop(0.08-1, bicubic, antialiased) + flip + the policy's geometric part (RandomAffine, where
  `aa` came from a default or a recipe: `geometric_part`) + Normalize + random erasing; eval as for RGB.
  8-bit sources are resized as uint8 (rounded and clipped, as PIL does) and then scaled to 0..1 (as ToTensor
  does), deeper ones stay float32 in their units;
  `check_channel_options` refuses the colour options typed for them there.
Normalisation uses the given per-channel mean and std (fcmae.data.normalization.resolve_mean_std).
"""
import math
import re
from typing import AbstractSet, List, Optional, Sequence

import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import posterize
from timm.data.random_erasing import RandomErasing
from torchvision import transforms

from fcmae.runtime.errors import UsageError

from .normalization import HIGH_BIT_DEPTH, resolve_mean_std


class AsTensor:
    """PIL image -> uint8 (C, H, W) tensor (PILToTensor); tensors (the decoder's multi-band or float32 images) pass
    unchanged."""

    def __call__(self, img):
        return img if isinstance(img, torch.Tensor) else transforms.functional.pil_to_tensor(img)

    def __repr__(self):
        return f"{type(self).__name__}()"


def pretrain_transform(input_size):
    """The reference FCMAE augmentation, RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip, unnormalised
    (`normalize` runs on the device): 8-bit images (PIL, uint8 tensors) come out uint8 (C, H, W), float32 ones
    (high bit depth) float32 (C, H, W) in their units. PIL images are cropped by PIL as before, tensors by
    torchvision (bicubic, antialiased), with the same random draws."""
    return transforms.Compose([
        transforms.RandomResizedCrop(tuple(input_size), scale=(0.2, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.RandomHorizontalFlip(),
        AsTensor(),
    ])


EVAL_CROP_PCT = 0.875  # eval: resize to input / 0.875 (256 for 224), then centre crop
SQUASH_FROM = 384  # from this input size on, eval resizes to the input size without a crop (the reference's rule)
BICUBIC = transforms.InterpolationMode.BICUBIC


def check_channel_options(in_chans: int, aa: Optional[str] = None, color_jitter: Optional[float] = None,
                          kind: Optional[str] = None, typed: Optional[AbstractSet[str]] = None) -> List[str]:
    """UsageError for augmentations that assume 8-bit RGB when the images are not (`in_chans` != 3, or `kind`
    HIGH_BIT_DEPTH: a dataset's kind, once it is open): RandAugment/AutoAugment (`aa` other than None/'none') and
    colour jitter, where the user typed them (`typed`: the dests given on the command line; None: every value
    counts as typed). A value from a default or a recipe is replaced instead: `train_transform` applies the
    policy's geometric part (`geometric_part`) and no colour jitter to such images; the returned lines say so, for
    the log. For the CLI to call before anything runs, and again with the dataset's kind."""
    if in_chans < 1:
        raise UsageError(f"--in-chans must be >= 1, got {in_chans}")
    if in_chans == 3 and kind != HIGH_BIT_DEPTH:
        return []
    assumes, what = ("RGB", f"--in-chans {in_chans}") if in_chans != 3 else ("8-bit RGB", "16-bit or float images")
    replaced = []
    if aa not in (None, "", "none"):
        if typed is None or "aa" in typed:
            raise UsageError(f"RandAugment's colour operations assume {assumes}; pass --aa none for {what}")
        replaced.append(f"{what}: RandAugment's colour operations assume {assumes}; using "
                        f"{geometric_part(aa).transforms[0]!r} (its rotate, shear and translate, with probability "
                        f"{GEOMETRIC_P:.2f}) instead of --aa {aa}")
    if color_jitter:
        if typed is None or "color_jitter" in typed:
            raise UsageError(f"colour jitter assumes {assumes}; leave out --color-jitter for {what}")
        replaced.append(f"{what}: colour jitter assumes {assumes}; --color-jitter {color_jitter} left out")
    return replaced


# RandAugment's geometric operations at magnitude m (timm's ranges, m of 10): rotate 30 m/10 degrees, shear
# 0.3 m/10, translate 0.45 m/10 of the size ('rand' policies' translate_pct). timm's ops are PIL operations (RGB);
# RandomAffine does the three at once on tensors of any channel count and bit depth. It applies as often as
# RandAugment's two draws (each op applied with p 0.5) pick one of the 5 geometric ops among 15: 1 - (1 - 1/6)^2.
GEOMETRIC_P = 1 - (1 - 0.5 * 5 / 15) ** 2
DEFAULT_MAGNITUDE = 9  # for policies without an -mN part (AutoAugment's 'original', 'v0')


def geometric_part(aa: str) -> transforms.RandomApply:
    """The channel-agnostic stand-in for auto-augment policy `aa` (see GEOMETRIC_P)."""
    found = re.search(r"-m(\d+(?:\.\d+)?)", aa)
    m = min(float(found.group(1)) if found else DEFAULT_MAGNITUDE, 10) / 10
    shear = round(math.degrees(math.atan(0.3 * m)), 1)
    return transforms.RandomApply([transforms.RandomAffine(degrees=round(30 * m, 2), translate=(0.45 * m, 0.45 * m),
                                                           shear=(-shear, shear, -shear, shear),
                                                           interpolation=transforms.InterpolationMode.BILINEAR)],
                                  p=GEOMETRIC_P)


class RGBOrTensor(transforms.Compose):
    """timm's RGB pipeline (its `transforms`) for PIL images, `tensor` for tensors: 8-bit RGB goes through timm's
    PIL operations, float32 RGB (high bit depth) through the tensor pipeline."""

    def __init__(self, pil: transforms.Compose, tensor):
        super().__init__(pil.transforms)
        self.tensor = tensor

    def __call__(self, img):
        return self.tensor(img) if isinstance(img, torch.Tensor) else super().__call__(img)


class ToFloat:
    """Tensor -> float32 (C, H, W): 8-bit (uint8) scaled to 0..1 as ToTensor does, floats unchanged."""

    def __call__(self, x):
        return x.float().div(255) if x.dtype == torch.uint8 else x.float()

    def __repr__(self):
        return f"{type(self).__name__}()"


def train_transform(input_size, aa: Optional[str], reprob: float, in_chans: int = 3,
                    mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                    color_jitter: Optional[float] = None):
    """The fine-tuning augmentation (module docstring), bicubic; mean/std None: the defaults of resolve_mean_std."""
    mean, std = resolve_mean_std(in_chans, mean, std)
    tensor = transforms.Compose([
        AsTensor(),
        transforms.RandomResizedCrop(tuple(input_size), interpolation=BICUBIC, antialias=True),
        transforms.RandomHorizontalFlip(),
    ] + ([geometric_part(aa)] if aa not in (None, "", "none") else []) + [
        ToFloat(),
        transforms.Normalize(mean, std),
    ] + ([RandomErasing(reprob, mode="pixel", max_count=1, device="cpu")] if reprob > 0 else []))
    if in_chans != 3:
        return tensor
    pil = create_transform(tuple(input_size), is_training=True, auto_augment=aa, color_jitter=color_jitter,
                           interpolation="bicubic", re_prob=reprob, re_mode="pixel", re_count=1, mean=mean, std=std)
    for op in _augment_ops(pil):
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return RGBOrTensor(pil, tensor)


def _posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, also for 0 bits: rand-m9-mstd0.5 reaches magnitude 10 (0 bits kept) in about 2% of
    its posterize draws; Pillow >= 13 raises there, older Pillow (the recipe's) returned a black image."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return posterize(img, bits_to_keep, **kwargs)


def _augment_ops(transform):
    """timm AugmentOps inside a Compose: RandAugment/AugMix `.ops`, AutoAugment `.policy` (lists of ops)."""
    for t in getattr(transform, "transforms", []):
        yield from getattr(t, "ops", [])
        for sub_policy in getattr(t, "policy", []):
            yield from sub_policy


def eval_transform(input_size, in_chans: int = 3, mean: Optional[Sequence[float]] = None,
                   std: Optional[Sequence[float]] = None):
    """Resize to input / 0.875 + centre crop, or from SQUASH_FROM on a plain resize to the input size (bicubic),
    then Normalize."""
    mean, std = resolve_mean_std(in_chans, mean, std)
    size = tuple(input_size)
    squash = min(size) >= SQUASH_FROM
    if squash:
        geometry = [transforms.Resize(size, interpolation=BICUBIC, antialias=True)]
    else:  # timm's scale size: the shorter side for a square input, both sides otherwise
        scale = tuple(math.floor(s / EVAL_CROP_PCT) for s in size)
        geometry = [transforms.Resize(scale[0] if scale[0] == scale[1] else scale, interpolation=BICUBIC,
                                      antialias=True), transforms.CenterCrop(size)]
    tensor = transforms.Compose([AsTensor()] + geometry + [ToFloat(), transforms.Normalize(mean, std)])
    if in_chans != 3:
        return tensor
    pil = create_transform(size, is_training=False, interpolation="bicubic", mean=mean, std=std,
                           crop_pct=1.0 if squash else EVAL_CROP_PCT, crop_mode="squash" if squash else "center")
    return RGBOrTensor(pil, tensor)
