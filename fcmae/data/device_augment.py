"""Decoding and augmentation on the training device (`--augment-on-device`): the DataLoader workers read each JPEG's
bytes and header and draw its crop box and flip; the training process decodes the batch's JPEGs in one call
(`torchvision.io.decode_jpeg`: nvJPEG on a GPU, libjpeg-turbo on a CPU), applies their EXIF orientation, crops,
resizes (bicubic, antialiased), flips, and the batch is normalised as every batch is
(fcmae.data.normalization.normalize).

The same draws as the CPU path: a worker seeded with (seed, epoch, index) (fcmae.data.sampling) makes exactly the
calls of pretrain_transform, RandomResizedCrop's `get_params` on the image size the CPU path would see and then
RandomHorizontalFlip's draw, before the mask is drawn; so a sample gets the same box, flip and mask with or
without the option, and resume stays exact.

Boxes and reduced-size decoding: the CPU path decodes a JPEG much larger than the input at 1/2, 1/4 or 1/8 scale
(PIL's draft, fcmae.data.decode) and draws its box on that smaller, EXIF-oriented image. The device decodes at full
size, so the box is drawn on the size the CPU path sees (from the header: `draft` computes it without decoding)
and multiplied by the scale factor, clipped at the image's edge: the same part of the scene. Where no reduced
decoding applies (images under 2x the input size on a side, as ImageNet's mostly are) the boxes are equal and the
pixels differ only by the resampler; where it applies the device resizes from more pixels (fewer aliasing errors),
so the pixels differ more (docs/gpu.md gives the measured differences).

A sample goes to the device when its file is named .jpg/.jpeg, PIL reads it as a JPEG of mode RGB or L (L only
with --in-chans 1), its bytes end with the end-of-image marker (a truncated download does not), and it is not over
fcmae.data.decode.MAX_PIXELS. Every other sample (PNG, TIFF, 16-bit, .npy, CMYK or truncated JPEGs, ...) is decoded
and augmented in the worker exactly as without the option, skipping and counting bad files as before
(fcmae.data.bad_samples), and travels in the same batch. A JPEG that passes these checks but that neither the
device nor torchvision's CPU decoder can decode is marked bad in the main process (so --max-bad-fraction counts
it) and replaced by a mean-valued image for that step.
"""
import io
import logging
import os
import warnings
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from fcmae.runtime.errors import UsageError

from .decode import MAX_PIXELS, MEAN_GREY, MEAN_RGB
from .normalization import HIGH_BIT_DEPTH

log = logging.getLogger("fcmae")

JPEG_EXTENSIONS = (".jpg", ".jpeg")
JPEG_MODES = {3: ("RGB", "L"), 1: ("L",)}  # --in-chans -> JPEG modes the device decodes (grey replicated for RGB)
EXIF_ORIENTATION = 0x0112
TRANSPOSING = (5, 6, 7, 8)  # EXIF orientations that swap height and width
END_OF_IMAGE = b"\xff\xd9"


def check_options(data_path: Optional[str], in_chans: int):
    """UsageError where --augment-on-device cannot apply, before any data is read."""
    if not data_path:
        raise UsageError("--augment-on-device decodes JPEG files on the device: give --data-path (a folder or tar "
                         "shards of JPEGs); the built-in dataset has none")
    if in_chans not in JPEG_MODES:
        raise UsageError(f"--augment-on-device decodes JPEGs, which hold 1 or 3 channels: with --in-chans {in_chans} "
                         "every image would be decoded on the CPU anyway; leave it out")
    try:
        from torchvision.io import ImageReadMode, decode_jpeg  # noqa: F401
    except ImportError:  # torchvision >= 0.29 deprecates its decoders in favour of TorchCodec
        raise UsageError("--augment-on-device needs torchvision.io.decode_jpeg, which this torchvision lacks") from None


# ---------------------------------------------------------------- in the workers


@dataclass(frozen=True)
class EncodedJpeg:
    """One sample for the device: the JPEG file, its crop box (top, left, height, width) in the EXIF-oriented
    full-size image, its flip, its EXIF orientation (1-8, applied on the device) and its sample index."""
    data: bytes
    box: Tuple[int, int, int, int]
    flip: bool
    orientation: int
    index: int


@dataclass(frozen=True)
class JpegGeometry:
    size: Tuple[int, int]  # (height, width) of the EXIF-oriented full-size image
    drawn_on: Tuple[int, int]  # (height, width) the CPU path sees: reduced-size decoding, then orientation
    scale: int  # the reduced-size decoding's factor (1, 2, 4 or 8)
    orientation: int


def jpeg_geometry(data: bytes, modes: Sequence[str], draft_side: Optional[int]) -> Optional[JpegGeometry]:
    """The geometry of a plain 8-bit JPEG from its header, or None where the CPU path must decode it (module
    docstring). Raises for a header PIL cannot read (the CPU path then decides what the file is)."""
    if not data.rstrip(b"\0").endswith(END_OF_IMAGE):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's warnings on odd EXIF or big images: the CPU path's rules decide
        img = Image.open(io.BytesIO(data))
        if img.format != "JPEG" or img.mode not in modes or img.width * img.height > MAX_PIXELS:
            return None
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
        full = (img.height, img.width)
        scale = 1
        if draft_side:  # what fcmae.data.decode's reader asks for; `draft` only sets up the decoder
            drafted = img.draft(None, (draft_side, draft_side))
            if drafted is not None:
                scale = round(full[1] / drafted[1][2])  # its box: (0, 0, width / scale, height / scale)
        drawn_on = (img.height, img.width)
    orientation = int(orientation) if orientation in range(2, 9) else 1  # ImageOps.exif_transpose ignores others
    if orientation in TRANSPOSING:
        full, drawn_on = full[::-1], drawn_on[::-1]
    return JpegGeometry(full, drawn_on, scale, orientation)


def scaled_box(box, scale: int, size) -> Tuple[int, int, int, int]:
    """A box (top, left, height, width) drawn on the reduced-size image, on the full-size image of `size`
    (height, width): each reduced pixel covers `scale` x `scale` full ones; the last row and column of the reduced
    image may cover fewer (its size was rounded up), hence the clipping."""
    top, left, height, width = box
    return (top * scale, left * scale, min((top + height) * scale, size[0]) - top * scale,
            min((left + width) * scale, size[1]) - left * scale)


class DeviceJpegs(Dataset):
    """`files` (fcmae.data.folders.ImageFiles or fcmae.data.shards.TarShards, with pretrain_transform as its
    transform) for --augment-on-device: `(EncodedJpeg, target)` for the JPEGs the device decodes, `files[i]`
    (decoded and augmented on the CPU, bad files skipped) for the others. Keeps `.dataset`, so the bad-file monitor
    finds the files. UsageError where nothing could be decoded on the device: a high-bit-depth data set, or no
    file named .jpg/.jpeg."""

    def __init__(self, files):
        if files.kind == HIGH_BIT_DEPTH:
            raise UsageError(f"--augment-on-device decodes 8-bit JPEGs, but the images in {files.where} hold 16-bit or "
                             "float values (e.g. " + os.path.relpath(files.kind_file, files.root) + "): leave it out")
        if not any(_is_jpeg_name(files.filename(i)) for i in range(len(files))):
            raise UsageError(f"--augment-on-device decodes JPEGs, but {files.where} has no .jpg or .jpeg files: leave "
                             "it out")
        self.dataset = files
        self.crop, self.flip = files.transform.transforms[:2]  # pretrain_transform's RandomResizedCrop and flip
        self.modes = JPEG_MODES[files.in_chans]
        self._point = torch.empty(())

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        files = self.dataset
        found = None
        if _is_jpeg_name(files.filename(i)):
            try:
                data = files.read_bytes(i)
                found = jpeg_geometry(data, self.modes, files.draft_side)
            except Exception:  # unreadable file or header: the CPU path skips it by its rules
                found = None
        if found is None:
            return files[i]
        # pretrain_transform's draws, in its order, on the image size it would see
        box = self.crop.get_params(self._point.expand(1, *found.drawn_on), self.crop.scale, self.crop.ratio)
        flip = bool(torch.rand(1) < self.flip.p)
        box = scaled_box(box, found.scale, found.size)
        return EncodedJpeg(data, box, flip, found.orientation, i), files.target(i)


def _is_jpeg_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in JPEG_EXTENSIONS


@dataclass(frozen=True)
class JpegBatch:
    """A batch for the device, as few tensors as possible (each tensor a worker sends costs a shared-memory file):
    the JPEG files one after another in `data` (`sizes` bytes each) with their `boxes` (K, 4), `flips`,
    `orientations`, batch positions `jpeg_at` and sample `indices`; the CPU-augmented images `decoded` (uint8
    (N - K, C, H, W)) at positions `decoded_at`. `.to(device)` moves the decoded images (the JPEG bytes stay on
    the host: decode_jpeg takes them from there) and records the device for DeviceAugment."""
    data: torch.Tensor
    sizes: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor
    orientations: torch.Tensor
    jpeg_at: torch.Tensor
    indices: torch.Tensor
    decoded: Optional[torch.Tensor]
    decoded_at: torch.Tensor
    device: torch.device = torch.device("cpu")

    @staticmethod
    def of(samples: List[Union[EncodedJpeg, torch.Tensor]]) -> "JpegBatch":
        jpegs = [(k, s) for k, s in enumerate(samples) if isinstance(s, EncodedJpeg)]
        decoded = [(k, s) for k, s in enumerate(samples) if not isinstance(s, EncodedJpeg)]
        sizes = [len(s.data) for _, s in jpegs]
        data = torch.empty(sum(sizes), dtype=torch.uint8)
        view, offset = data.numpy(), 0
        for size, (_, s) in zip(sizes, jpegs):
            view[offset:offset + size] = np.frombuffer(s.data, dtype=np.uint8)
            offset += size
        return JpegBatch(
            data=data, sizes=torch.tensor(sizes, dtype=torch.int64),
            boxes=torch.tensor([s.box for _, s in jpegs], dtype=torch.int64).reshape(-1, 4),
            flips=torch.tensor([s.flip for _, s in jpegs], dtype=torch.bool),
            orientations=torch.tensor([s.orientation for _, s in jpegs], dtype=torch.int64),
            jpeg_at=torch.tensor([k for k, _ in jpegs], dtype=torch.int64),
            indices=torch.tensor([s.index for _, s in jpegs], dtype=torch.int64),
            decoded=torch.stack([s for _, s in decoded]) if decoded else None,
            decoded_at=torch.tensor([k for k, _ in decoded], dtype=torch.int64))

    def __len__(self):
        return len(self.jpeg_at) + len(self.decoded_at)

    def to(self, device, non_blocking: bool = False) -> "JpegBatch":
        decoded = None if self.decoded is None else self.decoded.to(device, non_blocking=non_blocking)
        return replace(self, decoded=decoded, device=torch.device(device))

    def pin_memory(self) -> "JpegBatch":  # DataLoader(pin_memory=True) calls it
        return self if self.decoded is None else replace(self, decoded=self.decoded.pin_memory())


def collate_pairs(samples):
    """The DataLoader's collate_fn for (image, mask) samples (fcmae.pretrain.data.MaskedImages over DeviceJpegs):
    (JpegBatch, masks)."""
    images, masks = zip(*samples)
    return JpegBatch.of(list(images)), torch.stack(masks)


# ---------------------------------------------------------------- in the training process


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """PIL's ImageOps.exif_transpose on a (C, H, W) tensor: EXIF orientation 1-8 to upright."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip((-2, -1))
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:  # transpose
        return img.transpose(-2, -1)
    if orientation == 6:  # rotate 270 degrees counter-clockwise
        return torch.rot90(img, -1, (-2, -1))
    if orientation == 7:  # transverse
        return img.transpose(-2, -1).flip((-2, -1))
    if orientation == 8:  # rotate 90 degrees counter-clockwise
        return torch.rot90(img, 1, (-2, -1))
    return img


class DeviceAugment:
    """`augment(batch)`: a JpegBatch (moved with `.to(device)`) as the uint8 (N, C, H, W) batch on its device,
    the JPEGs decoded in one call, oriented, cropped, resized (bicubic, antialiased, rounded to 8 bits as PIL
    does), flipped; the CPU-augmented images in their places. `files`: the dataset whose bad-file marks count
    what no decoder could read."""

    def __init__(self, input_size, in_chans: int, files):
        from torchvision.io import ImageReadMode

        self.size, self.in_chans, self.files = tuple(input_size), in_chans, files
        self.mode = ImageReadMode.GRAY if in_chans == 1 else ImageReadMode.RGB
        # batches the decoder rejected as a whole (then decoded one by one), files decoded on the host instead
        self.batches_one_by_one, self.on_host = 0, 0

    def __call__(self, batch: JpegBatch) -> torch.Tensor:
        device = batch.device
        slots: List[Optional[torch.Tensor]] = [None] * len(batch)
        for k, position in enumerate(batch.decoded_at.tolist()):
            slots[position] = batch.decoded[k]
        if len(batch.jpeg_at):
            encoded = list(torch.split(batch.data, batch.sizes.tolist()))
            images = self._decode(encoded, device, batch.indices.tolist())
            for img, box, flip, orientation, position in zip(images, batch.boxes.tolist(), batch.flips.tolist(),
                                                              batch.orientations.tolist(), batch.jpeg_at.tolist()):
                slots[position] = self._augment(img, box, flip, orientation) if img is not None \
                    else self._mean_image(device)
        return torch.stack(slots)

    def _augment(self, img, box, flip: bool, orientation: int) -> torch.Tensor:
        top, left, height, width = box
        crop = orient(img, orientation)[:, top:top + height, left:left + width]
        out = F.interpolate(crop[None].float(), size=self.size, mode="bicubic", align_corners=False, antialias=True)[0]
        out = out.round_().clamp_(0, 255).to(torch.uint8)
        return out.flip(-1) if flip else out  # the CPU path flips after resizing too

    def _decode(self, encoded: List[torch.Tensor], device: torch.device, indices: List[int]):
        from torchvision.io import decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision >= 0.29 points to TorchCodec
            try:
                return decode_jpeg(encoded, mode=self.mode, device=device)
            except RuntimeError as e:  # one file the decoder rejects fails the whole call: decode one by one
                if not self.batches_one_by_one:
                    log.warning("decode_jpeg on %s rejected a batch (%s): its files are decoded one by one", device,
                                str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
                self.batches_one_by_one += 1
                return [self._decode_one(data, device, i) for data, i in zip(encoded, indices)]

    def _decode_one(self, encoded: torch.Tensor, device: torch.device, index: int) -> Optional[torch.Tensor]:
        from torchvision.io import decode_jpeg

        try:
            return decode_jpeg(encoded, mode=self.mode, device=device)
        except RuntimeError as e:
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if device.type != "cpu":
            try:  # e.g. a JPEG variant nvJPEG does not take
                img = decode_jpeg(encoded, mode=self.mode).to(device)
                self.on_host += 1
                return img
            except RuntimeError:
                pass
        self.files.bad[index] = 1  # counted against --max-bad-fraction by the monitor's next poll
        log.warning("could not decode %s (%s); a mean-valued image stands in for it in this step",
                    self.files.filename(index), reason)
        return None

    def _mean_image(self, device) -> torch.Tensor:
        mean = MEAN_RGB if self.in_chans == 3 else (MEAN_GREY,)
        return torch.tensor(mean, dtype=torch.uint8, device=device).reshape(-1, 1, 1).expand(-1, *self.size)
