"""Labelled data: train and val sets (folders of class subfolders, tar shards with .cls labels, or Fashion-MNIST)
with their transforms (fcmae.data.transforms), and seeded class-stratified subsets. Fine-tuning trains and
evaluates on them; the kNN monitor and tools read their features.
"""
import os
from dataclasses import dataclass
from typing import AbstractSet, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset, Subset

from fcmae.runtime.errors import DataError

from .fashion_mnist import FashionMNIST
from .folders import image_folder
from .normalization import resolve_mean_std
from .transforms import check_channel_options, eval_transform, train_transform


def targets_of(dataset) -> np.ndarray:
    if hasattr(dataset, "targets"):  # Fashion-MNIST, tar shards
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
    replaced: Tuple[str, ...] = ()  # augmentations replaced to fit the images (check_channel_options), for the log


def _shard_pair(train_dir: str, val_dir: str, train_tf, val_tf, **options):
    """train/ and val/ as folders of WebDataset tar shards with .cls labels (python -m fcmae.tools.make_shards)."""
    from .shards import TarShards

    train, val = TarShards(train_dir, transform=train_tf, **options), TarShards(val_dir, transform=val_tf, **options)
    for ds, where in ((train, train_dir), (val, val_dir)):
        if (np.asarray(ds.targets) < 0).any():
            raise DataError(f"{where}: {int((np.asarray(ds.targets) < 0).sum())} samples have no .cls label")
    if val.num_classes > train.num_classes:
        raise DataError(f"{val_dir} has labels up to {val.num_classes - 1}, train/ only up to {train.num_classes - 1}")
    return train, val, list(train.classes)


def _folder_pair(data_path: str, train_tf, val_tf, **options):
    """`data_path/train` defines the classes; `data_path/val` must use a subset of them. `options`: image_folder's
    decoding and bad-file settings. Both may instead be folders of tar shards."""
    from .shards import is_shards

    if is_shards(os.path.join(data_path, "train")):
        return _shard_pair(os.path.join(data_path, "train"), os.path.join(data_path, "val"), train_tf, val_tf,
                           **options)
    train = image_folder(os.path.join(data_path, "train"), transform=train_tf, **options)
    classes = train.class_to_idx
    if "" in classes:
        raise DataError(f"{data_path}/train has images outside class subfolders; expected train/<class>/<image>")
    val_dir = os.path.join(data_path, "val")
    val_classes = set(image_folder(val_dir, in_chans=options.get("in_chans", 3)).class_to_idx)
    unknown = sorted(val_classes - set(classes))
    if unknown:
        raise DataError(f"{val_dir} has classes not in train/: {', '.join(unknown[:5])}"
                        + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    val = image_folder(val_dir, transform=val_tf, class_to_idx=classes, **options)
    return train, val, sorted(classes, key=classes.get)


def build_datasets(*, data_path: Optional[str], input_size, in_chans: int = 3,
                   mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                   aa: Optional[str] = None, reprob: float = 0.0, color_jitter: Optional[float] = None,
                   train_subset: Optional[int] = None, label_fraction: Optional[float] = None,
                   val_subset: Optional[int] = None, seed: int = 0, bad_image: str = "skip",
                   max_bad_fraction: float = 0.01, train: bool = True, augment: bool = True,
                   typed: Optional[AbstractSet[str]] = None) -> Datasets:
    """Train and val sets with their transforms and the subsets asked for: `data_path` with train/<class>/* and
    val/<class>/*, or Fashion-MNIST (None). `input_size` (H, W); mean/std None: the defaults of
    fcmae.data.resolve_mean_std (8-bit sources only: UsageError for high-bit-depth folders). With train=False the
    train set is still read (it defines the classes) but not subsetted; with augment=False it gets the eval
    transform too (kNN evaluation reads features of both sets the same way). UsageError for colour options the
    images cannot take where typed (check_channel_options: `typed`, the options given on the command line; default
    and recipe values are replaced, said in `replaced`), DataError for missing or unreadable data."""
    aa = None if aa in ("", "none") or not augment else aa
    color_jitter = color_jitter if augment else None
    check_channel_options(in_chans, aa, color_jitter, typed=typed)
    given = None if mean is None and std is None else resolve_mean_std(in_chans, mean, std)
    input_size = tuple(input_size)
    if data_path:
        train_ds, val_ds, classes = _folder_pair(data_path, None, None, input_size=input_size, bad_image=bad_image,
                                                 max_bad_fraction=max_bad_fraction, in_chans=in_chans)
        kind = train_ds.kind
        if None not in (kind, val_ds.kind) and val_ds.kind != kind:
            raise DataError(f"{data_path}/train holds {kind} images but {data_path}/val {val_ds.kind} ones; "
                            "both must be of one kind to share a normalisation")
    else:
        train_ds, val_ds = (FashionMNIST(split, in_chans=in_chans) for split in ("train", "val"))
        classes, kind = list(train_ds.classes), None
    replaced = tuple(check_channel_options(in_chans, aa, color_jitter, kind, typed))
    mean, std = given or resolve_mean_std(in_chans, kind=kind)
    val_ds.transform = eval_transform(input_size, in_chans, mean, std)
    train_ds.transform = train_transform(input_size, aa, reprob, in_chans, mean, std, color_jitter) if augment \
        else val_ds.transform
    if train:
        n = train_subset
        if label_fraction is not None:
            n = max(1, round(label_fraction * len(train_ds)))
        if n is not None:
            train_ds = _subset(train_ds, n, seed, "--train-subset/--label-fraction")
    if val_subset is not None:
        val_ds = _subset(val_ds, val_subset, seed + 1, "--val-subset")
    return Datasets(train_ds, val_ds, classes, replaced)


def _subset(dataset, n: int, seed: int, flag: str):
    if n > len(dataset):
        raise DataError(f"{flag} asks for {n} images but the set has {len(dataset)}")
    return Subset(dataset, stratified_subset(targets_of(dataset), n, seed).tolist())
