"""Pretraining's data: unlabelled images (a folder or tar shards, else Fashion-MNIST's training split), each with
the reference augmentation and a fresh random mask, normalised on the device; and the labelled sets of the kNN
monitor."""
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset

from fcmae.data.device_augment import DeviceAugment, DeviceJpegs, JpegBatch, collate_pairs
from fcmae.data.fashion_mnist import FashionMNIST
from fcmae.data.labelled import build_datasets
from fcmae.data.normalization import normalize, resolve_mean_std
from fcmae.data.shards import open_dataset
from fcmae.data.transforms import pretrain_transform
from models.masking import random_mask


class MaskedImages(Dataset):
    """(image, mask) pairs for pretraining: labels dropped, a fresh random mask (N=1 row of (L,)) per sample."""

    def __init__(self, dataset, num_patches: int, mask_ratio: float):
        self.dataset, self.num_patches, self.mask_ratio = dataset, num_patches, mask_ratio

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0], random_mask(1, self.num_patches, self.mask_ratio)[0]


@dataclass(frozen=True)
class PretrainData:
    """The unlabelled training images and how a batch is prepared on the device: normalised there (the loader
    moves uint8 or native-unit float32 tensors) and optionally made channels-last. With --augment-on-device
    (`on_device`) the loader's batches are JpegBatches (`collate`, `stack`), decoded and augmented on the device
    before the normalisation (fcmae.data.device_augment)."""
    dataset: Dataset
    mean: Sequence[float]
    std: Sequence[float]
    channels_last: bool
    on_device: Optional[DeviceAugment] = None

    @property
    def collate(self):
        """The loader's collate_fn for (image, mask) samples (None: DataLoader's default)."""
        return collate_pairs if self.on_device is not None else None

    def stack(self, images: list):
        """A batch of the dataset's images, as the loader would make it."""
        return JpegBatch.of(images) if self.on_device is not None else torch.stack(images)

    def prepare(self, imgs, target):
        if self.on_device is not None:
            imgs = self.on_device(imgs)
        imgs = normalize(imgs, self.mean, self.std)
        if self.channels_last:
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        return imgs, target


def pretrain_data(args) -> PretrainData:
    resolve_mean_std(args.in_chans, args.mean, args.std)  # a wrong list stops us before the data is read
    transform = pretrain_transform(args.input_size)
    if args.data_path:
        dataset = open_dataset(args.data_path, transform=transform, input_size=args.input_size,
                               in_chans=args.in_chans, bad_image=args.bad_image,
                               max_bad_fraction=args.max_bad_fraction)
        kind = dataset.kind
    else:
        dataset, kind = FashionMNIST("train", transform=transform, in_chans=args.in_chans), None
    mean, std = resolve_mean_std(args.in_chans, args.mean, args.std, kind=kind)
    on_device = None
    if args.augment_on_device:  # the options were checked (fcmae.data.device_augment.check_options)
        dataset = DeviceJpegs(dataset)
        on_device = DeviceAugment(args.input_size, args.in_chans, dataset.dataset)
    return PretrainData(dataset, mean, std, args.channels_last, on_device)


@dataclass(frozen=True)
class KnnSets:
    bank: Dataset
    queries: Dataset
    num_classes: int


def knn_data(args) -> KnnSets:
    """Labelled bank and query sets for the kNN monitor, through fine-tuning's evaluation transform at the
    pretraining input size: --knn-data, else the built-in dataset's labels (stratified, seeded subsets)."""
    data = build_datasets(data_path=args.knn_data, input_size=args.input_size, in_chans=args.in_chans,
                          mean=args.mean, std=args.std, train_subset=args.knn_bank, val_subset=args.knn_queries,
                          seed=args.seed, max_bad_fraction=args.max_bad_fraction, augment=False)
    return KnnSets(data.train, data.val, len(data.classes))
