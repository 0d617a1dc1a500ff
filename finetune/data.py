"""Fine-tuning data: labelled train/val sets, timm's train/eval transforms, seeded subsets.

Samples are PIL images until the transform (RandAugment and friends work on PIL); Fashion-MNIST's grey
images are served as RGB by fcmae.data.FashionMNIST.
"""
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import posterize
from torch.utils.data import Dataset, Subset

from fcmae.data import IMAGENET_MEAN, IMAGENET_STD, DataError, FashionMNIST, image_folder

EVAL_CROP_PCT = 0.875  # eval: resize to input / 0.875 (256 for 224), then centre crop


def train_transform(input_size, aa: Optional[str], reprob: float):
    """RandomResizedCrop + flip + RandAugment + random erasing (bicubic), the reference recipe via timm."""
    transform = create_transform(tuple(input_size), is_training=True, auto_augment=aa, interpolation="bicubic",
                                 re_prob=reprob, re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for op in _augment_ops(transform):
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return transform


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


def eval_transform(input_size):
    return create_transform(tuple(input_size), is_training=False, interpolation="bicubic", crop_pct=EVAL_CROP_PCT,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


def targets_of(dataset) -> np.ndarray:
    if isinstance(dataset, FashionMNIST):
        return np.asarray(dataset.targets)
    return np.asarray([t for _, t in dataset.samples])


def stratified_subset(targets: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of `n` samples drawn with `seed`, classes kept in proportion (so a 1% label split still has
    every class when n >= number of classes). Sorted, so the subset is a fixed set, not an order."""
    rng = np.random.default_rng(seed)
    quantile = np.empty(len(targets))
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        quantile[idx] = np.arange(len(idx)) / len(idx)  # the n smallest quantiles keep class proportions
    order = np.lexsort((rng.random(len(targets)), quantile))
    return np.sort(order[:n])


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    classes: List[str]


def _folder_pair(data_path: str, train_tf, val_tf, **options):
    """`data_path/train` defines the classes; `data_path/val` must use a subset of them. `options`: image_folder's
    decoding and bad-file settings."""
    train = image_folder(os.path.join(data_path, "train"), transform=train_tf, **options)
    classes = train.class_to_idx
    if "" in classes:
        raise DataError(f"{data_path}/train has images outside class subfolders; expected train/<class>/<image>")
    val_dir = os.path.join(data_path, "val")
    val_classes = set(image_folder(val_dir).class_to_idx)
    unknown = sorted(val_classes - set(classes))
    if unknown:
        raise DataError(f"{val_dir} has classes not in train/: {', '.join(unknown[:5])}"
                        + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    val = image_folder(val_dir, transform=val_tf, class_to_idx=classes, **options)
    return train, val, sorted(classes, key=classes.get)


def build_datasets(args, train: bool = True, augment: bool = True) -> Datasets:
    """Train and val sets with their transforms and the subsets asked for. With train=False the train set is
    still read (it defines the classes) but not subsetted; with augment=False it gets the eval transform too
    (kNN evaluation reads features of both sets the same way)."""
    val_tf = eval_transform(args.input_size)
    train_tf = train_transform(args.input_size, args.aa, args.reprob) if augment else val_tf
    if args.data_path:
        train_ds, val_ds, classes = _folder_pair(args.data_path, train_tf, val_tf, input_size=args.input_size,
                                                 bad_image=args.bad_image, max_bad_fraction=args.max_bad_fraction)
    else:
        train_ds, val_ds = FashionMNIST("train", transform=train_tf), FashionMNIST("val", transform=val_tf)
        classes = list(train_ds.classes)
    if train:
        n = args.train_subset
        if args.label_fraction is not None:
            n = max(1, round(args.label_fraction * len(train_ds)))
        if n is not None:
            train_ds = _subset(train_ds, n, args.seed, "--train-subset/--label-fraction")
    if args.val_subset is not None:
        val_ds = _subset(val_ds, args.val_subset, args.seed + 1, "--val-subset")
    return Datasets(train_ds, val_ds, classes)


def _subset(dataset, n: int, seed: int, flag: str):
    if n > len(dataset):
        raise DataError(f"{flag} asks for {n} images but the set has {len(dataset)}")
    return Subset(dataset, stratified_subset(targets_of(dataset), n, seed).tolist())
