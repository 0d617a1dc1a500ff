"""Decoding one image file (or a tar member's bytes) to `in_chans` channels without losing precision, for 8-bit
photos and for multi-band / high-bit-depth data (satellite tiles, CT/MRI slices, microscopy stacks).

`decode(f, name, in_chans, draft_side)`: a seekable binary file object, its name's extension picks the
reader) gives one of:
- a PIL image, 'RGB' (in_chans 3) or 'L' (in_chans 1), for 8-bit sources: the PIL transforms and reduced-scale JPEG
  decoding apply as before;
- a uint8 tensor (C, H, W) for 8-bit sources of other channel counts (a 4-band 8-bit TIFF, an RGBA PNG with
  in_chans 4);
- a float32 tensor (C, H, W) for deeper sources (16/32-bit integers, floats, signed 8-bit) in their native units:
  no 8-bit step. float32 holds integers exactly up to 2**24.
An 8-bit source is meant to be scaled to 0..1 downstream (fcmae.data.normalization.normalize divides uint8 by 255), a deeper one
is normalised in its own units with per-channel statistics (fcmae/tools/data_stats.py).

Readers:
- `.npy` (NumPy): (H, W) is one channel, (H, W, C) is C channels; other shapes, and object or complex arrays, are
  unreadable. A (C, H, W) array is read as (H, W, C): its width fails the channel check, whose reason names the
  shape.
- `.tif`/`.tiff` (tifffile, else PIL alone; LZW and most other compressions need `imagecodecs`): reduced-resolution
  pages (GeoTIFF overviews) and masks are ignored. Layout rule:
  * pages are channels when there are exactly `in_chans` (> 1) pages, each one 2-D with one sample per pixel and
    all of the same shape and type (a microscopy stack of C single-channel pages; also with in_chans 3, where a
    3-page grey TIFF was read as its first page before);
  * otherwise the first page alone is the image, its samples per pixel the channels, whether interleaved
    (H, W, bands) or planar (bands, H, W) (a multi-band GeoTIFF, an RGB TIFF); further pages are ignored as PIL
    ignores further frames, and the channel check names the page count.
  Values are the raw samples (no palette lookup, orientation or min-is-white inversion) except where the PIL rules
  below apply: 8-bit photo-like TIFFs (grey, grey+alpha, RGB(A), palette, CMYK, YCbCr) with in_chans 1 or 3, and
  one-sample TIFFs of any depth with in_chans 3.
- every other extension (and the TIFFs just named): PIL, by these rules:
  * in_chans 3, the photo rules, unchanged: the first frame of multi-frame files; EXIF orientation applied;
    16-bit (`I;16*`) scaled 65535 -> 255 (PIL's own convert clips at 255, which turns them white); 32-bit int `I`
    as 16-bit when all values lie in 0..65535, else stretched min..max -> 0..255; float `F` scaled 1 -> 255 when
    all values lie in 0..1, else stretched min..max -> 0..255 (a constant image becomes black); NaN/inf count as 0;
    alpha (`RGBA`, `LA`, `PA`, `RGBa`, palette or grey or RGB with a transparent colour) composited over the
    ImageNet mean colour MEAN_RGB, so transparent areas normalise to about zero; every other mode (`L`, `1`, `P`,
    `CMYK`, `YCbCr`, `LAB`, `HSV`, ...) by PIL's conversion (CMYK naively: no ICC colour management);
  * in_chans 1: grey files stay one channel: 8-bit grey ('L', bilevel '1') as 'L', grey with alpha composited over
    the grey mean MEAN_GREY; deeper grey (`I;16*`, `I`, `F`) as float32 in native units; colour files (RGB,
    palette, CMYK, ...) have the wrong channel count;
  * other in_chans: 8-bit files whose bands are that many (LA: 2, RGBA and CMYK: 4) as raw uint8 bands; the rest
    have the wrong channel count.
- JPEGs much larger than needed are decoded at a reduced scale (libjpeg's DCT scaling, PIL `draft`), keeping both
  sides at least 2x the largest input side, so a 24-megapixel photo costs a fraction of a full decode;
- decompression bombs: a file of more than MAX_PIXELS pixels, or one that would decode to more than
  MAX_DECODED_BYTES bytes (width x height x bands x bytes per sample, summed over the pages of a TIFF stack: the
  pixel limit alone lets a 10 KB deflate TIFF of many bands or float64 samples decode to gigabytes), is unreadable,
  judged from its header before anything is decoded (PIL: the mode after the JPEG draft; tifffile: the page's
  shape and sample type; .npy: the array header). PIL's own DecompressionBombWarning threshold is raised to
  MAX_PIXELS, so images under this module's limits (and the transforms' crops of them) do not warn;
- only regular files are opened (`open_file`): a FIFO or device named like an image is unreadable at once
  instead of blocking the reader for ever or reading without end.
"""
import logging
import os
import stat
import warnings
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

from .normalization import EIGHT_BIT, GREY_MEAN, HIGH_BIT_DEPTH, IMAGENET_MEAN

try:
    import tifffile
except ImportError:  # TIFFs are then PIL's: 8-bit and grey ones as before, no multi-band or 16-bit RGB
    tifffile = None

logging.getLogger("tifffile").setLevel(logging.ERROR)  # odd tags are logged as warnings: clutter, as PIL's are

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm",
                    ".npy")
TIFF_EXTENSIONS = (".tif", ".tiff")
MEAN_RGB = tuple(round(255 * m) for m in IMAGENET_MEAN)  # (124, 116, 104)
MEAN_GREY = round(255 * GREY_MEAN[0])  # 114
MAX_PIXELS = 178_956_970  # PIL's default hard decompression-bomb limit (2 x its default Image.MAX_IMAGE_PIXELS)
MAX_DECODED_BYTES = 3 * MAX_PIXELS  # an 8-bit RGB image at the pixel limit, about 537 MB
# PIL warns above MAX_IMAGE_PIXELS pixels (half our limit), also when the transforms crop a large image; our own
# limits are checked from each file's header, so its warning would only be noise (its hard limit becomes 2x ours)
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


Decoded = Union[Image.Image, torch.Tensor]


def decode(f, name: str, in_chans: int = 3, draft_side: Optional[int] = None) -> Decoded:
    """One image from the seekable binary file object `f` by the module's rules, the extension of `name` choosing
    the reader: a PIL 'RGB'/'L' image (8-bit, in_chans 3/1), a uint8 (C, H, W) tensor (8-bit, other C) or a
    float32 (C, H, W) tensor in native units (deeper sources). Raises (any exception) when it cannot be read,
    has other than `in_chans` channels, or holds NaN/inf."""
    ext = os.path.splitext(name)[1].lower()
    with warnings.catch_warnings():
        # PIL and tifffile warn about large images, odd EXIF or tags, palette transparency; all of that is
        # handled here, and warnings from worker processes would only clutter the log
        warnings.simplefilter("ignore")
        if ext == ".npy":
            return _from_planes(*_read_npy(f), in_chans)
        if ext in TIFF_EXTENSIONS and tifffile is not None:
            found = _read_tiff(f, in_chans)
            if found is not None:
                return _from_planes(*found, in_chans)
            f.seek(0)
        img = _open_pil(f, draft_side)
        if in_chans == 3:
            return to_rgb(img)
        if in_chans == 1:
            return _to_grey(img)
        return _pil_bands(img, in_chans)


def open_file(path: str):
    """The regular file at `path` opened for binary reading. Anything else named like an image raises at once: a
    FIFO would block its reader until a writer comes (it is opened non-blocking to find out), a device such as
    /dev/zero reads without end."""
    f = open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK))  # f.name stays the path
    try:
        mode = os.fstat(f.fileno()).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "a folder, not a file", path)
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
            raise ValueError(f"{kind}, not a regular file")
        os.set_blocking(f.fileno(), True)
        return f
    except BaseException:
        f.close()
        raise


def load(path: str, in_chans: int = 3, draft_side: Optional[int] = None) -> Decoded:
    """`decode` of the file at `path` (a regular file: `open_file`)."""
    with open_file(path) as f:
        return decode(f, path, in_chans, draft_side)


def load_rgb(path: str, draft_side: Optional[int] = None) -> Image.Image:
    """An 8-bit RGB PIL image of any file PIL reads, by the photo rules (whatever its depth); raises when it
    cannot be read."""
    with open_file(path) as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_rgb(_open_pil(f, draft_side))


def kind_of(img: Decoded) -> str:
    """EIGHT_BIT (PIL image, uint8 tensor: scaled to 0..1 downstream) or HIGH_BIT_DEPTH (float32, native units)."""
    return EIGHT_BIT if isinstance(img, Image.Image) or img.dtype == torch.uint8 else HIGH_BIT_DEPTH


def _check_pixels(height: int, width: int):
    if height * width > MAX_PIXELS:
        raise ValueError(f"{width}x{height} = {width * height} pixels, over the limit of {MAX_PIXELS} "
                         "(fcmae.data.decode.MAX_PIXELS)")


def _check_bytes(nbytes: int, what: str):
    """`what` (its shape and sample type, from the header) would decode to `nbytes`: refused over the limit."""
    if nbytes > MAX_DECODED_BYTES:
        raise ValueError(f"{what} would decode to {nbytes:,} bytes, over the limit of {MAX_DECODED_BYTES:,} bytes "
                         "(fcmae.data.decode.MAX_DECODED_BYTES; a decompression bomb?)")


def _open_pil(f, draft_side: Optional[int]) -> Image.Image:
    img = Image.open(f)
    _check_pixels(img.height, img.width)
    if draft_side and img.format == "JPEG":
        img.draft(None, (draft_side, draft_side))  # scale 1/2, 1/4 or 1/8, each side kept >= draft_side
    mode = ImageMode.getmode(img.mode)
    _check_bytes(img.width * img.height * len(mode.bands) * np.dtype(mode.typestr).itemsize,
                 f"a {img.width}x{img.height} {img.mode} image")
    img.load()
    ImageOps.exif_transpose(img, in_place=True)
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB by the photo rules (deep modes scaled, alpha over the mean colour, the rest by PIL)."""
    if img.mode.startswith("I") or img.mode == "F":
        img = Image.fromarray(_to_uint8(np.asarray(img), img.mode))
    if img.has_transparency_data:
        background = Image.new("RGBA", img.size, MEAN_RGB + (255,))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    a = np.where(np.isfinite(a), a, 0).astype(np.float64)
    lo, hi = a.min(), a.max()
    if (mode.startswith("I;16") or mode == "I") and lo >= 0 and hi <= 65535:
        a = a / 257  # 65535 -> 255
    elif mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255
    else:
        a = (a - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.rint(a).astype(np.uint8)


PIL_CHANNELS = {"1": 1, "L": 1, "I": 1, "F": 1, "LA": 2, "La": 2, "PA": 4, "P": 3, "RGBA": 4, "RGBa": 4, "CMYK": 4}


def _channels(img: Image.Image) -> int:
    if img.mode.startswith("I;16"):
        return 1
    n = PIL_CHANNELS.get(img.mode, len(img.getbands()))
    return 4 if img.mode == "P" and img.has_transparency_data else n


def _wrong_channels(found: int, in_chans: int, detail: str = "") -> ValueError:
    return ValueError(f"{found} channel{'s' * (found != 1)}, expected {in_chans} (--in-chans){detail}")


def _to_grey(img: Image.Image) -> Decoded:
    """One channel: 8-bit grey as 'L' (alpha over MEAN_GREY), deeper grey as float32 (1, H, W)."""
    if img.mode.startswith("I") or img.mode == "F":
        return _float_planes(np.asarray(img)[None])
    if img.mode not in ("1", "L", "LA", "La"):
        raise _wrong_channels(_channels(img), 1, f", a {img.mode} image")
    if img.has_transparency_data:
        background = Image.new("RGBA", img.size, (MEAN_GREY, MEAN_GREY, MEAN_GREY, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))  # grey stays grey: L of (g, g, g) is g
    return img if img.mode == "L" else img.convert("L")


def _pil_bands(img: Image.Image, in_chans: int) -> torch.Tensor:
    """8-bit files with `in_chans` bands (LA, RGBA, CMYK), raw, as uint8 (C, H, W)."""
    if img.mode not in ("LA", "RGBA", "CMYK") or len(img.getbands()) != in_chans:
        raise _wrong_channels(_channels(img), in_chans, f", a {img.mode} image; multi-band data goes in TIFF or "
                                                        ".npy files")
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)))


def _read_npy(f):
    """((C, H, W) array, description) of a .npy file: (H, W) or (H, W, C), size checked from the header first."""
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(f)
    if len(shape) not in (2, 3):
        raise ValueError(f"a .npy array of shape {shape}; expected (H, W) or (H, W, channels)")
    if dtype.kind not in "biuf":
        raise ValueError(f"a .npy array of {dtype}; expected integers, floats or booleans")
    _check_pixels(shape[0], shape[1])
    _check_bytes(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, f"a .npy array of shape {shape} and {dtype}")
    f.seek(0)
    a = np.load(f, allow_pickle=False)
    planes = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return planes, f", a .npy array of shape {a.shape} read as (H, W, channels)"


def _read_tiff(f, in_chans: int):
    """((C, H, W) array, description) of a TIFF by the module's layout rule, or None where PIL's rules apply."""
    PHOTOMETRIC = tifffile.PHOTOMETRIC
    with tifffile.TiffFile(f) as tif:
        pages = [p for p in tif.pages if not (p.subfiletype & 0b101)]  # no overviews (1) or transparency masks (4)
        if not pages:
            raise ValueError("a TIFF without a full-resolution page")
        first = pages[0]
        _check_pixels(first.imagelength, first.imagewidth)
        if first.dtype is None or first.dtype.kind not in "biuf":  # before the channel check, which would misname it
            kind = "an unsupported sample format" if first.dtype is None else f"{first.dtype} samples"
            raise ValueError(f"a TIFF of {kind}; expected integers, floats or booleans")
        if in_chans > 1 and len(pages) == in_chans and all(
                p.samplesperpixel == 1 and len(p.shape) == 2 and p.shape == first.shape and p.dtype == first.dtype
                for p in pages):
            _check_bytes(sum(p.nbytes for p in pages), f"a TIFF stack of {len(pages)} pages of {first.shape} "
                                                       f"{first.dtype}")
            return np.stack([p.asarray() for p in pages]), f", a TIFF stack of {len(pages)} pages"
        spp, photometric = first.samplesperpixel, first.photometric
        photo_like = (photometric in (PHOTOMETRIC.MINISBLACK, PHOTOMETRIC.MINISWHITE) and spp <= 2
                      or photometric in (PHOTOMETRIC.RGB, PHOTOMETRIC.YCBCR) and spp in (3, 4)
                      or photometric == PHOTOMETRIC.PALETTE and spp == 1
                      or photometric == PHOTOMETRIC.SEPARATED and spp == 4)
        eight_bit = first.dtype in (np.uint8, np.bool_)
        if photo_like and (eight_bit and in_chans in (1, 3) or in_chans == 3 and spp == 1):
            return None
        _check_bytes(first.nbytes, f"a TIFF page of shape {first.shape} and {first.dtype}")
        axes, a = first.axes, first.asarray()
        if axes == "YX":
            planes = a[None]
        elif axes == "YXS":
            planes = a.transpose(2, 0, 1)
        elif axes == "SYX":
            planes = a
        else:
            raise ValueError(f"a TIFF page of axes {axes} (shape {a.shape}); expected rows, columns and samples")
        detail = f", a TIFF of {len(pages)} pages (its pages are channels only when there are --in-chans of " \
                 f"them, each of one sample)" if len(pages) > 1 else ", a TIFF"
        return planes, detail


def _from_planes(planes: np.ndarray, detail: str, in_chans: int) -> Decoded:
    """A (C, H, W) array as the module's decoded types, its channel count and values checked."""
    if planes.shape[0] != in_chans:
        raise _wrong_channels(planes.shape[0], in_chans, detail)
    if planes.dtype == np.bool_:
        planes = planes.astype(np.uint8) * 255
    if planes.dtype == np.uint8:
        if in_chans == 3:
            return Image.fromarray(np.ascontiguousarray(planes.transpose(1, 2, 0)))  # (H, W, 3) uint8: RGB
        if in_chans == 1:
            return Image.fromarray(np.ascontiguousarray(planes[0]))  # (H, W) uint8: L
        return torch.from_numpy(np.ascontiguousarray(planes))
    return _float_planes(planes)


def _float_planes(planes: np.ndarray) -> torch.Tensor:
    if planes.dtype.kind not in "iuf":
        raise ValueError(f"unsupported sample type {planes.dtype}")
    x = torch.from_numpy(np.array(planes, dtype=np.float32, order="C"))  # a copy: contiguous and writable
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"non-finite pixel values ({bad} of {x.numel()} are NaN or inf"
                         f"{', or beyond float32' if planes.dtype.itemsize > 4 else ''})")
    return x


def describe(error: Exception, path: str) -> str:
    """A short reason for a log line or an error message (`path`: the file, or "" for in-memory bytes)."""
    if isinstance(error, FileNotFoundError):
        return "file not found (removed after the folder was listed?)"
    if isinstance(error, IsADirectoryError):
        return "a folder, not a file"
    if isinstance(error, PermissionError):
        return "permission denied"
    if path and os.path.isfile(path) and os.path.getsize(path) == 0:
        return "empty file"
    if isinstance(error, UnidentifiedImageError):  # its message repeats the path
        return "not an image, or a format PIL cannot read"
    if type(error).__name__ == "TiffFileError":
        return f"not a TIFF file, or a damaged one ({str(error).splitlines()[0][:120]})"
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return message.splitlines()[0][:200] if message else type(error).__name__
