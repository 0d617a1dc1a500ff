"""Datasets and transforms shared by pretraining and fine-tuning.

Channels and units: images have `in_chans` channels (fcmae/images.py decodes files). Transforms here leave them
unnormalised, uint8 for 8-bit sources and float32 in native units for deeper ones; `normalize` (or the `Normalizer`
module) then runs on the batch on the device: uint8 divided by 255, minus the per-channel mean, over the std.
`resolve_mean_std` checks the per-channel lists and supplies the defaults for 8-bit sources (ImageNet's for RGB).

Exact resume needs data order and augmentation to be functions of (seed, epoch, index) alone: fcmae/sampling.py
(EpochSampler, SeededDataset) sees to that.
"""
import gzip
import math
import os
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from .errors import DataError, UsageError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN = (0.449,)  # the average of ImageNet's R, G, B values: the default for 8-bit grey (in_chans 1)
GREY_STD = (0.226,)
EIGHT_BIT, HIGH_BIT_DEPTH = "8-bit", "high-bit-depth"  # the two kinds of decoded image (fcmae.images.kind_of)


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
        how = f"compute them with `python -m tools.data_stats FOLDER --in-chans {in_chans}`"
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
    return mean, std


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


class Normalizer(torch.nn.Module):
    """`normalize` with the mean and std held as (non-persistent) buffers, so `.to(device)` moves them once."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.mean, self.std)


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class FashionMNIST(Dataset):
    """Debian's dataset-fashion-mnist (70k 28x28 grey images, 10 classes), served as PIL images: grey 'L' with
    in_chans 1, RGB (grey replicated) with in_chans 3."""

    def __init__(self, split: str = "train", root: str = FASHION_MNIST_DIR, transform=None,
                 indices: Optional[Sequence[int]] = None, in_chans: int = 3):
        if in_chans not in (1, 3):
            raise UsageError(f"Fashion-MNIST is grey: --in-chans 1 (as it is) or 3 (grey replicated to RGB), "
                             f"not {in_chans}")
        self.mode = "L" if in_chans == 1 else "RGB"
        prefix = {"train": "train", "val": "t10k", "test": "t10k"}[split]
        images = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
        if not os.path.exists(images):
            raise DataError(f"Fashion-MNIST not found at {root}: run `bash tools/setup.sh` "
                            f"(installs Debian's dataset-fashion-mnist) or pass --data-path")
        self.images = _read_idx(images)
        self.targets = _read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
        if indices is not None:
            self.images, self.targets = self.images[np.asarray(indices)], self.targets[np.asarray(indices)]
        self.transform = transform
        self.classes = FASHION_MNIST_CLASSES

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i]).convert(self.mode)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[i])


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


class MaskedImages(Dataset):
    """(image, mask) pairs for pretraining: labels dropped, a fresh random mask (N=1 row of (L,)) per sample."""

    def __init__(self, dataset, num_patches: int, mask_ratio: float):
        self.dataset, self.num_patches, self.mask_ratio = dataset, num_patches, mask_ratio

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        from models.masking import random_mask

        return self.dataset[i][0], random_mask(1, self.num_patches, self.mask_ratio)[0]
