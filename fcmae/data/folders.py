"""Image folders for training: timm's folder reader (recursive, natural-sorted, class subfolders optional,
`class_to_idx` as in timm), extended to the formats PIL reads and NumPy arrays (IMAGE_EXTENSIONS, any case); each
file decoded by fcmae.data.decode, unreadable ones skipped and counted by fcmae.data.bad_samples.
"""
import os

import numpy as np
from timm.data.readers.reader_image_folder import find_images_and_targets

from fcmae.runtime.errors import DataError

from .bad_samples import SkippingDataset
from .decode import IMAGE_EXTENSIONS, Decoded, describe, load


class ImageFiles(SkippingDataset):
    """(decoded image, target) for each image file under `root`, `in_chans` channels each (see `decode`); bad files
    skipped as the module describes.

    `input_size` (the transform's output, int or (H, W)) lets big JPEGs decode at a reduced scale;
    `bad_image` and `max_bad_fraction` set when bad files stop the run. `kind` is EIGHT_BIT or HIGH_BIT_DEPTH, that
    of the first file (in listing order) that loads, `kind_file` (None when none of the first 100 does); files of
    the other kind are bad."""

    def __init__(self, root: str, transform=None, class_to_idx=None, input_size=None, bad_image: str = "skip",
                 max_bad_fraction: float = 0.01, in_chans: int = 3):
        if not os.path.isdir(root):
            raise DataError(f"data folder not found: {root}")
        self.samples, self.class_to_idx = find_images_and_targets(root, types=IMAGE_EXTENSIONS,
                                                                  class_to_idx=class_to_idx or None)
        if not self.samples:
            raise DataError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        self.root, self.where, self.transform, self.in_chans = root, root, transform, in_chans
        self.draft_side = 2 * int(max(np.atleast_1d(input_size))) if input_size is not None else None
        self.bad_image, self.max_bad_fraction = bad_image, max_bad_fraction
        self._count_bad()
        self.probe_kind()

    def keep_only(self, indices):
        """Restrict the dataset to these files (in this order), its bad-file count and limit with it."""
        self.samples = [self.samples[i] for i in indices]
        self._count_bad()

    def __len__(self):
        return len(self.samples)

    def filename(self, i: int) -> str:
        return self.samples[i][0]

    def target(self, i: int) -> int:
        return self.samples[i][1]

    def read_bytes(self, i: int) -> bytes:
        """File i's bytes, undecoded (--augment-on-device decodes JPEGs on the training device)."""
        with open(self.samples[i][0], "rb") as f:
            return f.read()

    def load(self, i: int) -> Decoded:
        """File i decoded (no transform); raises when it cannot be read."""
        return load(self.samples[i][0], self.in_chans, self.draft_side)

    def reason(self, error: Exception, i: int) -> str:
        return describe(error, self.filename(i))


def image_folder(root: str, transform=None, class_to_idx=None, input_size=None, bad_image: str = "skip",
                 max_bad_fraction: float = 0.01, in_chans: int = 3):
    """A folder of images, with or without class subfolders (timm's reader), decoded to `in_chans` channels with
    unreadable files skipped and counted (this module). A missing folder or one without images is a DataError,
    raised here."""
    return ImageFiles(root, transform=transform, class_to_idx=class_to_idx, input_size=input_size,
                      bad_image=bad_image, max_bad_fraction=max_bad_fraction, in_chans=in_chans)
