"""Image folders that survive bad files: every file decodes to an 8-bit RGB PIL image, unreadable ones are skipped
(counted, logged once, capped) instead of stopping or silently thinning a days-long run.

Listing: timm's folder reader (recursive, natural-sorted, class subfolders optional, `class_to_idx` as in timm),
extended to the formats PIL reads (IMAGE_EXTENSIONS, any case).

Decoding rules (`load_rgb`):
- the first frame of multi-frame files (animated GIF/PNG/WebP, multi-page TIFF);
- EXIF orientation applied;
- 16-bit (`I;16*`) scaled 65535 -> 255 (PIL's own convert clips at 255, which turns them white); 32-bit int `I`
  as 16-bit when all values lie in 0..65535, else stretched min..max -> 0..255; float `F` scaled 1 -> 255 when all
  values lie in 0..1, else stretched min..max -> 0..255 (a constant image becomes black); NaN/inf count as 0;
- alpha (`RGBA`, `LA`, `PA`, `RGBa`, palette or grey or RGB with a transparent colour) composited over the ImageNet
  mean colour MEAN_RGB, so transparent areas normalise to about zero;
- every other mode (`L`, `1`, `P`, `CMYK`, `YCbCr`, `LAB`, `HSV`, ...) by PIL's conversion (CMYK naively: no ICC
  colour management);
- JPEGs much larger than needed are decoded at a reduced scale (libjpeg's DCT scaling, PIL `draft`), keeping both
  sides at least 2x the largest input side, so a 24-megapixel photo costs a fraction of a full decode;
- a file of more than MAX_PIXELS pixels is unreadable ("decompression bomb"), judged from its header alone.

Unreadable files (empty, truncated, not an image, an unsupported format, removed after listing, over the pixel
limit) are replaced by the next index (cyclically) that loads, so what a sample index yields stays a function of
the index alone and the seeded order and exact resume of fcmae.data hold. Each is marked in a shared-memory
tensor, which DataLoader worker processes write and the main process reads: `BadImageMonitor.poll()` logs each
newly marked file once with its reason and raises DataError once there are more than --max-bad-fraction of
them (or, with --bad-image error, at the first). Past that limit a worker of a monitored dataset returns a
mean-colour stand-in, so it does not die with a traceback, and the poll before the next step stops the run
before that batch is used; unmonitored, the worker raises. In the main process the dataset raises the DataError
itself.
"""
import logging
import math
import os
import warnings
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data.readers.reader_image_folder import find_images_and_targets
from torch.utils.data import Dataset, get_worker_info

from .data import IMAGENET_MEAN
from .errors import DataError

log = logging.getLogger("fcmae")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm")
MEAN_RGB = tuple(round(255 * m) for m in IMAGENET_MEAN)  # (124, 116, 104)
MAX_PIXELS = 178_956_970  # PIL's own hard decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS), so both agree


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB by the module's rules (deep modes scaled, alpha over the mean colour, the rest by PIL)."""
    if img.mode.startswith("I") or img.mode == "F":
        img = Image.fromarray(_to_uint8(np.asarray(img), img.mode))
    if img.has_transparency_data:
        background = Image.new("RGBA", img.size, MEAN_RGB + (255,))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    a = np.where(np.isfinite(a), a, 0).astype(np.float64)
    lo, hi = a.min(), a.max()
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        a = a / 257  # 65535 -> 255
    elif mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255
    else:
        a = (a - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.rint(a).astype(np.uint8)


def load_rgb(path: str, draft_side: Optional[int] = None) -> Image.Image:
    """Decode one file by the module's rules; raises (any exception) when it cannot be read."""
    with open(path, "rb") as f, warnings.catch_warnings():
        # PIL warns about large images, odd EXIF or palette transparency; all of that is handled here, and
        # warnings from worker processes would only clutter the log
        warnings.simplefilter("ignore")
        img = Image.open(f)
        if img.width * img.height > MAX_PIXELS:
            raise ValueError(f"{img.width}x{img.height} = {img.width * img.height} pixels, over the limit of "
                             f"{MAX_PIXELS} (fcmae.images.MAX_PIXELS)")
        if draft_side and img.format == "JPEG":
            img.draft(None, (draft_side, draft_side))  # scale 1/2, 1/4 or 1/8, each side kept >= draft_side
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        return to_rgb(img)


def describe(error: Exception, path: str) -> str:
    """A short reason for a log line or an error message."""
    if isinstance(error, FileNotFoundError):
        return "file not found (removed after the folder was listed?)"
    if isinstance(error, IsADirectoryError):
        return "a folder, not a file"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, UnidentifiedImageError):  # its message repeats the path
        return "empty file" if os.path.getsize(path) == 0 else "not an image, or a format PIL cannot read"
    message = str(error).splitlines()[0] if str(error) else ""
    return message[:200] or type(error).__name__


class ImageFiles(Dataset):
    """(RGB image, target) for each image file under `root`; bad files skipped as the module describes.

    `input_size` (the transform's output, int or (H, W)) lets big JPEGs decode at a reduced scale;
    `bad_image` and `max_bad_fraction` set when bad files stop the run."""

    def __init__(self, root: str, transform=None, class_to_idx=None, input_size=None, bad_image: str = "skip",
                 max_bad_fraction: float = 0.01):
        if not os.path.isdir(root):
            raise DataError(f"data folder not found: {root}")
        self.samples, self.class_to_idx = find_images_and_targets(root, types=IMAGE_EXTENSIONS,
                                                                  class_to_idx=class_to_idx or None)
        if not self.samples:
            raise DataError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        self.root, self.transform = root, transform
        self.draft_side = 2 * int(max(np.atleast_1d(input_size))) if input_size is not None else None
        self.bad_image, self.max_bad_fraction = bad_image, max_bad_fraction
        # a run tolerates this many bad files; never all of them (there would be nothing to train on)
        allowed = 0 if bad_image == "error" else math.floor(max_bad_fraction * len(self.samples) + 1e-9)
        self.allowed = min(allowed, len(self.samples) - 1)
        # 1 = unreadable; in shared memory, so marks made in DataLoader workers reach the main process
        self.bad = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()
        self.monitored = False  # set by BadImageMonitor: someone polls the marks in the main process

    def __len__(self):
        return len(self.samples)

    def filename(self, i: int) -> str:
        return self.samples[i][0]

    def __getitem__(self, index):
        i = index
        while True:  # ends: once every file has failed, over_limit() holds
            try:
                img = load_rgb(self.samples[i][0], self.draft_side)
                break
            except Exception:
                self.bad[i] = 1
                if self.over_limit():
                    if get_worker_info() is None or not self.monitored:  # unmonitored: a worker traceback, but a stop
                        raise self.limit_error() from None
                    img, i = Image.new("RGB", (32, 32), MEAN_RGB), index  # stand-in; poll() stops the run
                    break
                i = (i + 1) % len(self.samples)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.samples[i][1]

    def bad_indices(self):
        return torch.nonzero(self.bad).flatten().tolist()

    def over_limit(self) -> bool:
        return int(self.bad.sum()) > self.allowed

    def problem(self, i: int) -> str:
        """Why file `i` does not load, found by reading it again (in the main process)."""
        path = self.samples[i][0]
        try:
            load_rgb(path, self.draft_side)
        except Exception as e:
            return describe(e, path)
        return "failed in a loader process but reads now (a passing I/O error?)"

    def limit_error(self) -> DataError:
        bad = self.bad_indices()
        if self.bad_image == "error":
            return DataError(f"unreadable image {self.filename(bad[0])}: {self.problem(bad[0])} (--bad-image error "
                             "stops at the first; --bad-image skip skips up to --max-bad-fraction of them)")
        named = [f"{os.path.relpath(self.filename(i), self.root)} ({self.problem(i)})" for i in bad[:3]]
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        why = "none can be read" if len(bad) == len(self) else f"over --max-bad-fraction {self.max_bad_fraction:g}"
        return DataError(f"{len(bad)} of {len(self)} images in {self.root} are unreadable ({why}); first: "
                         f"{', '.join(named)}{more}; remove or fix them, or raise --max-bad-fraction")


def _image_files(dataset) -> Optional[ImageFiles]:
    """The ImageFiles inside wrappers such as Subset, SeededDataset or MaskedImages (all keep `.dataset`)."""
    while not isinstance(dataset, ImageFiles) and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset if isinstance(dataset, ImageFiles) else None


class BadImageMonitor:
    """Main-process report of the bad files that any process met in the given datasets (others are ignored:
    in-memory sets such as Fashion-MNIST cannot have any). Create it before the DataLoaders, call `poll()` once
    per optimiser step (and after an evaluation)."""

    def __init__(self, *datasets):
        self.files = [f for f in map(_image_files, datasets) if f is not None]
        self.logged = [set() for _ in self.files]
        for files in self.files:
            files.monitored = True

    def poll(self):
        for files, logged in zip(self.files, self.logged):
            if int(files.bad.sum()) == len(logged):  # nothing new: the common case, one pass over a byte per file
                continue
            if files.over_limit():
                raise files.limit_error()
            for i in files.bad_indices():
                if i not in logged:
                    logged.add(i)
                    log.warning("skipped unreadable image %s: %s (%d so far; the run stops at %d)",
                                files.filename(i), files.problem(i), len(logged), files.allowed + 1)
