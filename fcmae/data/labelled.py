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
    if isinstance(dataset, Subset):
        return targets_of(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
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


VAL_SPLIT_SEED = 1000  # --val-split: the held-out set is drawn with this seed, not --seed, so every run shares it


def split_validation(targets: np.ndarray, n: int):
    """(held-out, remaining) sorted indices of the training set for --val-split N: N class-stratified images drawn
    with VAL_SPLIT_SEED (the same set for every --seed), and the rest, from which label subsets are drawn."""
    if n >= len(targets):
        raise DataError(f"--val-split {n} would hold out the whole training set ({len(targets)} images)")
    held = stratified_subset(targets, n, VAL_SPLIT_SEED)
    return held, np.setdiff1d(np.arange(len(targets)), held)


def labelled_subset(targets: np.ndarray, n: int, seed: int, pool: Optional[np.ndarray] = None) -> np.ndarray:
    """Sorted indices of the `n` labelled images --train-subset/--label-fraction train on with `seed`: a stratified
    draw from the training set, or from `pool` (the images --val-split leaves for training) when given."""
    if pool is None:
        return stratified_subset(targets, n, seed)
    return pool[stratified_subset(targets[pool], n, seed)]


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
    for ds in (train, val):
        ds.check_labels()  # every sample labelled, each label a class index (a bad one is refused, not skipped)
    if val.num_classes > train.num_classes:
        raise DataError(f"{val_dir} has labels up to {val.num_classes - 1}, train/ only up to {train.num_classes - 1}")
    return train, val, list(train.classes)


def _folder_pair(data_path: str, train_tf, val_tf, val_from_train: bool = False, **options):
    """`data_path/train` defines the classes; `data_path/val` must use a subset of them. `options`: image_folder's
    decoding and bad-file settings. Both may instead be folders of tar shards. val_from_train: the second set is
    train/ again (for --val-split to carve from), and val/ is not read."""
    from .shard_index import is_shards

    val_dir = os.path.join(data_path, "train" if val_from_train else "val")
    if is_shards(os.path.join(data_path, "train")):
        return _shard_pair(os.path.join(data_path, "train"), val_dir, train_tf, val_tf, **options)
    train = image_folder(os.path.join(data_path, "train"), transform=train_tf, **options)
    classes = train.class_to_idx
    if "" in classes:
        raise DataError(f"{data_path}/train has images outside class subfolders; expected train/<class>/<image>")
    unknown = [] if val_from_train else \
        sorted(set(image_folder(val_dir, in_chans=options.get("in_chans", 3)).class_to_idx) - set(classes))
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
                   val_split: Optional[int] = None, typed: Optional[AbstractSet[str]] = None) -> Datasets:
    """Train and val sets with their transforms and the subsets asked for: `data_path` with train/<class>/* and
    val/<class>/*, or Fashion-MNIST (None). `input_size` (H, W); mean/std None: the defaults of
    fcmae.data.normalization.resolve_mean_std (8-bit sources only: UsageError for high-bit-depth folders). With train=False the
    train set is still read (it defines the classes) but not subsetted; with augment=False it gets the eval
    transform too (kNN evaluation reads features of both sets the same way). UsageError for colour options the
    images cannot take where typed (check_channel_options: `typed`, the options given on the command line; default
    and recipe values are replaced, said in `replaced`), DataError for missing or unreadable data.

    val_split N (with train=True): `val` is N class-stratified training images held out with VAL_SPLIT_SEED (the
    same for every `seed`; eval transform), the data's own val/ is not read, and `train` (and its subset, whose
    size label_fraction still takes from the whole training set) comes from the other training images only."""
    aa = None if aa in ("", "none") or not augment else aa
    color_jitter = color_jitter if augment else None
    check_channel_options(in_chans, aa, color_jitter, typed=typed)
    given = None if mean is None and std is None else resolve_mean_std(in_chans, mean, std)
    input_size = tuple(input_size)
    held_out = bool(val_split) and train
    if data_path:
        train_ds, val_ds, classes = _folder_pair(data_path, None, None, val_from_train=held_out, input_size=input_size,
                                                 bad_image=bad_image, max_bad_fraction=max_bad_fraction,
                                                 in_chans=in_chans)
        kind = train_ds.kind
        if None not in (kind, val_ds.kind) and val_ds.kind != kind:
            raise DataError(f"{data_path}/train holds {kind} images but {data_path}/val {val_ds.kind} ones; "
                            "both must be of one kind to share a normalisation")
    else:
        train_ds = FashionMNIST("train", in_chans=in_chans)
        val_ds = FashionMNIST("train" if held_out else "val", in_chans=in_chans)
        classes, kind = list(train_ds.classes), None
    replaced = tuple(check_channel_options(in_chans, aa, color_jitter, kind, typed))
    mean, std = given or resolve_mean_std(in_chans, kind=kind)
    val_ds.transform = eval_transform(input_size, in_chans, mean, std)
    train_ds.transform = train_transform(input_size, aa, reprob, in_chans, mean, std, color_jitter) if augment \
        else val_ds.transform
    pool = None
    if held_out:  # val_ds is a second view of the training images, with the eval transform
        targets = targets_of(train_ds)
        if not np.array_equal(targets, targets_of(val_ds)):
            raise DataError(f"{data_path or 'Fashion-MNIST'}: the training set changed while it was read twice")
        held, pool = split_validation(targets, val_split)
        val_ds = Subset(val_ds, held.tolist())
    if train:
        n = train_subset
        if label_fraction is not None:
            n = max(1, round(label_fraction * len(train_ds)))
        if n is not None:
            train_ds = _subset(train_ds, n, seed, "--train-subset/--label-fraction", pool)
        elif pool is not None:
            train_ds = Subset(train_ds, pool.tolist())
    if val_subset is not None:
        val_ds = _subset(val_ds, val_subset, seed + 1, "--val-subset")
    return Datasets(train_ds, val_ds, classes, replaced)


def _subset(dataset, n: int, seed: int, flag: str, pool: Optional[np.ndarray] = None):
    available = len(dataset) if pool is None else len(pool)
    if n > available:
        left = "" if pool is None else " after --val-split"
        raise DataError(f"{flag} asks for {n} images but the set has {available}{left}")
    return Subset(dataset, labelled_subset(targets_of(dataset), n, seed, pool).tolist())
