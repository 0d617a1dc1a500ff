"""Datasets, transforms and the epoch sampler shared by pretraining and fine-tuning.

Exact resume needs data order and augmentation to be functions of (seed, epoch, index) alone:
`EpochSampler` draws the order from (seed, epoch) and can start mid-epoch, and `SeededDataset` seeds
each sample's augmentation from (seed, epoch, index) without touching the caller's RNG streams.
"""
import gzip
import math
import os
import random
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import transforms

from .errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class FashionMNIST(Dataset):
    """Debian's dataset-fashion-mnist (70k 28x28 grey images, 10 classes), served as RGB PIL images."""

    def __init__(self, split: str = "train", root: str = FASHION_MNIST_DIR, transform=None,
                 indices: Optional[Sequence[int]] = None):
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
        img = Image.fromarray(self.images[i]).convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[i])


def image_folder(root: str, transform=None, class_to_idx=None, input_size=None, bad_image: str = "skip",
                 max_bad_fraction: float = 0.01):
    """A folder of images, with or without class subfolders (timm's reader), decoded to RGB with unreadable files
    skipped and counted (fcmae/images.py). A missing folder or one without images is a DataError, raised here."""
    from .images import ImageFiles  # imports this module

    return ImageFiles(root, transform=transform, class_to_idx=class_to_idx, input_size=input_size,
                      bad_image=bad_image, max_bad_fraction=max_bad_fraction)


def pretrain_transform(input_size):
    """The reference FCMAE augmentation: RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(tuple(input_size), scale=(0.2, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
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


class SeededDataset(Dataset):
    """Seeds torch/numpy/python RNGs from (seed, epoch, index) around each sample's augmentation, so the
    augmentation of a sample does not depend on worker count, batch position or resume point."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        s = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + i
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s % 2 ** 32)
            try:
                return self.dataset[i]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class EpochSampler(Sampler):
    """Shuffled order fixed by (seed, epoch), sharded by rank like DistributedSampler (padded to equal shards),
    starting at `start` (samples of this rank already consumed) when resuming mid-epoch."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.shuffle, self.rank, self.world_size = size, seed, shuffle, rank, world_size
        self.num_samples = math.ceil(size / world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0):
        self.epoch, self.start = epoch, start

    def indices(self):
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        else:
            order = torch.arange(self.size)
        total = self.num_samples * self.world_size
        if total > self.size:
            order = torch.cat([order, order[: total - self.size]])
        return order[self.rank:total:self.world_size].tolist()

    def __iter__(self):
        return iter(self.indices()[self.start:])

    def __len__(self):
        return self.num_samples - self.start
