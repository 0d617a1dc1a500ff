"""The built-in dataset: Debian's dataset-fashion-mnist (70k real 28x28 grey images, 10 classes, MIT).
"""
import gzip
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from fcmae.runtime.errors import DataError, UsageError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


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
