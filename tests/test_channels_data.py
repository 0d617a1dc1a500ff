"""Data that is not 8-bit RGB (fcmae/data/decode.py, fcmae/data/normalization.py, fcmae/data/transforms.py, fcmae/data/labelled.py, fcmae/tools/data_stats.py): multi-band
16-bit TIFF tiles, 13-band .npy arrays, 16-bit grey PNG slices and float32 TIFFs decode to their exact values in
float32 (no 8-bit step), wrong band counts and NaN pixels are bad files, the transforms keep C channels and the
right dtype, 8-bit RGB normalised on the device is bit for bit the former pipeline, and data_stats agrees with
numpy."""
import io
import re

import numpy as np
import pytest
import tifffile
import torch
import yaml
from PIL import Image
from torchvision import transforms

from fcmae.data.bad_samples import BadImageMonitor
from fcmae.data.decode import decode, kind_of, load, load_rgb
from fcmae.data.fashion_mnist import FashionMNIST
from fcmae.data.folders import ImageFiles
from fcmae.data.labelled import build_datasets
from fcmae.data.normalization import (
    GREY_MEAN,
    GREY_STD,
    HIGH_BIT_DEPTH,
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalize,
    resolve_mean_std,
)
from fcmae.data.transforms import check_channel_options, eval_transform, pretrain_transform, train_transform
from fcmae.runtime.errors import DataError, UsageError

RNG = np.random.default_rng(1)
H, W = 40, 56


def tile16(bands=4, h=H, w=W):
    """(H, W, bands) uint16 covering the full range, odd values included (an 8-bit step would lose them)."""
    a = RNG.integers(0, 65536, (h, w, bands), dtype=np.uint16)
    a[0, 0], a[0, 1] = 65535, 1
    return a


def _tiff_bytes(data, **kw) -> io.BytesIO:
    buf = io.BytesIO()
    tifffile.imwrite(buf, data, **kw)
    buf.seek(0)
    return buf


def _npy_bytes(a) -> io.BytesIO:
    buf = io.BytesIO()
    np.save(buf, a)
    buf.seek(0)
    return buf


def _png_bytes(img) -> io.BytesIO:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    buf.seek(0)
    return buf


# ------------------------------------------------------------------------------------------------------------------
# decoding

@pytest.mark.parametrize("layout", ["interleaved", "planar", "pages", "lzw", "overviews"])
def test_multiband_16bit_tiff_exact(layout):
    a = tile16()
    chw = a.transpose(2, 0, 1)
    if layout == "interleaved":  # (H, W, bands): one page, samples interleaved (GDAL's PIXEL interleave)
        f = _tiff_bytes(a, photometric="minisblack", planarconfig="contig")
    elif layout == "planar":  # (bands, H, W) in one page (GDAL's BAND interleave)
        f = _tiff_bytes(chw, photometric="minisblack", planarconfig="separate")
    elif layout == "lzw":  # the usual GeoTIFF compression: needs imagecodecs
        pytest.importorskip("imagecodecs")
        f = _tiff_bytes(a, photometric="minisblack", planarconfig="contig", compression="lzw")
    else:  # one single-sample page per band (a microscopy stack); "overviews": plus reduced-resolution pages
        f = io.BytesIO()
        with tifffile.TiffWriter(f) as tw:
            for band in chw:
                tw.write(band, photometric="minisblack")
            if layout == "overviews":
                for band in chw:
                    tw.write(band[::2, ::2], photometric="minisblack", subfiletype=1)
        f.seek(0)
    x = decode(f, "tile.TIF", 4)
    assert x.dtype == torch.float32 and x.shape == (4, H, W)
    assert torch.equal(x, torch.from_numpy(chw.astype(np.float32)))


def test_tiff_layout_rule_and_channel_check():
    stack = np.stack([tile16(1)[..., 0] for _ in range(3)])  # 3 pages of one sample each
    pages = dict(photometric="minisblack")
    assert decode(_tiff_bytes(stack, **pages), "s.tif", 3).shape == (3, H, W)  # pages are channels: 3 == in_chans
    with pytest.raises(ValueError, match=r"^1 channel, expected 4 \(--in-chans\), a TIFF of 3 pages \(its pages are "
                                         r"channels only when there are --in-chans of them"):
        decode(_tiff_bytes(stack, **pages), "s.tif", 4)
    with pytest.raises(ValueError, match=r"^4 channels, expected 13 \(--in-chans\), a TIFF$"):
        decode(_tiff_bytes(tile16(), photometric="minisblack", planarconfig="contig"), "t.tif", 13)
    one = tile16(1)[..., 0]
    grey = decode(_tiff_bytes(one), "g.tif", 1)
    assert grey.shape == (1, H, W) and torch.equal(grey[0], torch.from_numpy(one.astype(np.float32)))
    u8 = tile16().astype(np.uint8)  # 8-bit, 4 bands: raw uint8 (C, H, W), scaled to 0..1 when normalised
    t = decode(_tiff_bytes(u8, photometric="minisblack", planarconfig="contig"), "u8.tif", 4)
    assert t.dtype == torch.uint8 and torch.equal(t, torch.from_numpy(u8.transpose(2, 0, 1).copy()))
    rgb16 = tile16(3)  # 16-bit RGB: native values with in_chans 3 (PIL would reduce it to 8 bits)
    x = decode(_tiff_bytes(rgb16, photometric="rgb"), "rgb16.tif", 3)
    assert x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(rgb16.transpose(2, 0, 1).astype(np.float32)))


def test_float32_tiff_and_nonfinite_values():
    ct = RNG.uniform(-1024, 3071, (H, W)).astype(np.float32)  # Hounsfield units: negative, fractional
    x = decode(_tiff_bytes(ct), "ct.tif", 1)
    assert x.dtype == torch.float32 and torch.equal(x[0], torch.from_numpy(ct))
    ct[3, 4], ct[5, 6] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"^non-finite pixel values \(2 of 2240 are NaN or inf\)$"):
        decode(_tiff_bytes(ct), "ct.tif", 1)
    big = np.full((4, 4), 1e300)  # float64 beyond float32's range
    with pytest.raises(ValueError, match=r"non-finite pixel values \(16 of 16 are NaN or inf, or beyond float32\)"):
        decode(_npy_bytes(big), "big.npy", 1)


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.float32, np.float64, np.int32])
def test_npy_13_bands_exact(dtype):
    a = RNG.integers(-2000, 30000, (H, W, 13)).astype(dtype)
    x = decode(_npy_bytes(a), "s2.npy", 13)
    assert x.dtype == torch.float32 and x.shape == (13, H, W)
    assert torch.equal(x, torch.from_numpy(a.transpose(2, 0, 1).astype(np.float32)))


def test_npy_shapes_and_types():
    grey = RNG.integers(0, 4096, (H, W), dtype=np.uint16)  # (H, W): one channel
    assert torch.equal(decode(_npy_bytes(grey), "a.npy", 1)[0], torch.from_numpy(grey.astype(np.float32)))
    u8 = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)  # 8-bit: PIL images, as 8-bit files give
    img = decode(_npy_bytes(u8), "a.npy", 3)
    assert isinstance(img, Image.Image) and img.mode == "RGB" and np.array_equal(np.asarray(img), u8)
    assert decode(_npy_bytes(u8[..., 0]), "a.npy", 1).mode == "L"
    u8x5 = RNG.integers(0, 256, (H, W, 5), dtype=np.uint8)
    t = decode(_npy_bytes(u8x5), "a.npy", 5)
    assert t.dtype == torch.uint8 and torch.equal(t, torch.from_numpy(u8x5.transpose(2, 0, 1)))
    with pytest.raises(ValueError, match=re.escape("56 channels, expected 13 (--in-chans), a .npy array of shape "
                                                   "(13, 40, 56) read as (H, W, channels)")):
        decode(_npy_bytes(np.zeros((13, H, W), np.float32)), "chw.npy", 13)
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4, 5\)"):
        decode(_npy_bytes(np.zeros((2, 3, 4, 5))), "a.npy", 4)
    with pytest.raises(ValueError, match="complex128"):
        decode(_npy_bytes(np.zeros((4, 4), complex)), "a.npy", 1)
    with pytest.raises(ValueError, match="object"):
        decode(_npy_bytes(np.array([[None]])), "a.npy", 1)


def test_grey_and_8bit_files():
    ramp16 = np.tile(np.arange(0, 65536, 257, dtype=np.uint16) - np.arange(256, dtype=np.uint16) % 2, (4, 1))
    png16 = _png_bytes(Image.fromarray(ramp16))  # a 16-bit grey PNG slice (I;16)
    x = decode(png16, "slice.png", 1)
    assert x.dtype == torch.float32 and torch.equal(x[0], torch.from_numpy(ramp16.astype(np.float32)))
    png16.seek(0)
    rgb = decode(png16, "slice.png", 3)  # in_chans 3: the photo rules (scaled to 8 bits, replicated), as before
    assert rgb.mode == "RGB" and np.asarray(rgb)[0, -1, 0] == 255
    grey8 = Image.fromarray(RNG.integers(0, 256, (H, W), dtype=np.uint8))
    g = decode(_png_bytes(grey8), "g.png", 1)
    assert g.mode == "L" and np.array_equal(np.asarray(g), np.asarray(grey8))
    with pytest.raises(ValueError, match=r"^3 channels, expected 1 \(--in-chans\), a RGB image$"):
        decode(_png_bytes(Image.new("RGB", (4, 4))), "c.png", 1)
    la = Image.fromarray(np.stack([np.full((2, 2), 200, np.uint8), np.array([[0, 255], [255, 255]], np.uint8)], -1),
                         "LA")
    assert np.asarray(decode(_png_bytes(la), "la.png", 1)).tolist() == [[114, 200], [200, 200]]  # over MEAN_GREY
    rgba = Image.fromarray(RNG.integers(0, 256, (H, W, 4), dtype=np.uint8))
    t = decode(_png_bytes(rgba), "rgbn.png", 4)  # 4 bands, raw (alpha too)
    assert t.dtype == torch.uint8 and torch.equal(t, torch.from_numpy(np.asarray(rgba).transpose(2, 0, 1).copy()))
    with pytest.raises(ValueError, match=r"^3 channels, expected 4 \(--in-chans\), a RGB image; multi-band"):
        decode(_png_bytes(Image.new("RGB", (4, 4))), "c.png", 4)


def test_8bit_rgb_decodes_as_before(tmp_path):
    """in_chans 3 and 8-bit files: exactly load_rgb (the photo rules), also for TIFFs and JPEG draft decoding."""
    photo = Image.fromarray(RNG.integers(0, 256, (600, 800, 3), dtype=np.uint8))
    cases = {"a.jpg": photo, "b.png": photo.convert("RGBA"), "c.tif": photo, "d.tif": photo.convert("L"),
             "e.tif": photo.convert("P"), "f.gif": photo.convert("P"), "g.tif": photo.convert("CMYK")}
    for name, img in cases.items():
        img.save(tmp_path / name)
        for draft in (None, 64):
            got = load(str(tmp_path / name), 3, draft)
            assert got.mode == "RGB" and kind_of(got) == "8-bit"
            assert np.array_equal(np.asarray(got), np.asarray(load_rgb(str(tmp_path / name), draft))), name
    assert load(str(tmp_path / "a.jpg"), 3, 64).size == (100, 75)  # 1/8 scale, both sides still >= 64


def test_unreadable_kinds_are_described(tmp_path, monkeypatch):
    from fcmae.data import decode
    from fcmae.data.decode import describe

    (tmp_path / "empty.tif").write_bytes(b"")
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "text.tif").write_bytes(b"not a tiff at all\n" * 4)
    (tmp_path / "text.npy").write_bytes(b"not an array\n" * 4)
    reasons = {}
    for name in ["empty.tif", "empty.npy", "text.tif", "text.npy"]:
        with pytest.raises(Exception) as e:
            load(str(tmp_path / name), 4)
        reasons[name] = describe(e.value, str(tmp_path / name))
    assert reasons["empty.tif"] == reasons["empty.npy"] == "empty file"
    assert reasons["text.tif"].startswith("not a TIFF file, or a damaged one")
    assert "magic" in reasons["text.npy"]
    rgb8 = tmp_path / "rgb8.tif"
    Image.new("RGB", (6, 4), (1, 2, 3)).save(rgb8)
    tifffile.imwrite(tmp_path / "four.tif", tile16(4, 6, 4), photometric="minisblack", planarconfig="contig")
    monkeypatch.setattr(decode, "tifffile", None)  # without tifffile: TIFFs are PIL's, as before
    assert load(str(rgb8), 3).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(Exception):
        load(str(tmp_path / "four.tif"), 4)


# ------------------------------------------------------------------------------------------------------------------
# folders: bad files

@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """A folder of 4-band 16-bit tiles (TIFF, interleaved and planar, and .npy) with 3 bad ones: 3 bands, NaN
    pixels, and an 8-bit 4-band tile (another kind than the folder's first). -> (root, {name: (4, H, W) values})"""
    root = tmp_path_factory.mktemp("tiles")
    good = {}
    for i in range(8):
        a = tile16()
        name = f"t{i}.npy" if i % 3 == 2 else f"t{i}.tif"
        if name.endswith(".npy"):
            np.save(root / name, a)
        else:
            tifffile.imwrite(root / name, a if i % 2 else a.transpose(2, 0, 1), photometric="minisblack",
                             planarconfig="contig" if i % 2 else "separate")
        good[name] = a.transpose(2, 0, 1).astype(np.float64)
    tifffile.imwrite(root / "x1_three.tif", tile16(3), photometric="minisblack", planarconfig="contig")
    nan = tile16().astype(np.float32)
    nan[1, 2, 3] = np.nan
    tifffile.imwrite(root / "x2_nan.tif", nan, photometric="minisblack", planarconfig="contig")
    tifffile.imwrite(root / "x3_8bit.tif", tile16().astype(np.uint8), photometric="minisblack",
                     planarconfig="contig")
    return root, good


BAD_TILES = {8: ("x1_three.tif", "3 channels, expected 4 (--in-chans), a TIFF"),
             9: ("x2_nan.tif", "non-finite pixel values (1 of 8960 are NaN or inf)"),
             10: ("x3_8bit.tif", "8-bit values, but the first image t0.tif is high-bit-depth")}


def test_bad_tiles_are_skipped_and_named(tiles, caplog):
    root, good = tiles
    ds = ImageFiles(str(root), in_chans=4, max_bad_fraction=0.5)
    assert ds.kind == HIGH_BIT_DEPTH and len(ds) == 11
    for i in range(len(ds)):
        x, _ = ds[i]
        j = i if i < 8 else 0  # the bad ones (the last three) are replaced by the next that loads: 0, cyclically
        assert torch.equal(x, torch.from_numpy(good[ds.filename(j).rsplit("/", 1)[1]].astype(np.float32)))
    assert ds.bad_indices() == sorted(BAD_TILES)
    for i, (name, reason) in BAD_TILES.items():
        assert ds.filename(i).endswith(name) and ds.problem(i).startswith(reason), ds.problem(i)
    monitor = BadImageMonitor(torch.utils.data.ConcatDataset([torch.utils.data.Subset(ds, [0, 1])]))
    with caplog.at_level("WARNING", logger="fcmae"):
        monitor.poll()
    assert [r.getMessage().split(": ", 1)[1].split(" (")[0] for r in caplog.records] == \
        [reason.split(" (")[0] for _, reason in BAD_TILES.values()]
    capped = ImageFiles(str(root), in_chans=4)  # 1% of 11: none allowed
    with pytest.raises(DataError, match=r"^1 of 11 images in .* are unreadable \(over --max-bad-fraction 0.01\); "
                                        r"first: x1_three.tif \(3 channels, expected 4 \(--in-chans\), a TIFF\)"):
        capped[8]


def test_past_the_limit_workers_return_a_stand_in_of_the_datasets_kind(tiles):
    root, _ = tiles
    ds = ImageFiles(str(root), transform=pretrain_transform((32, 32)), in_chans=4)
    BadImageMonitor(ds)  # monitored: workers return stand-ins past the limit, which must still collate
    batches = list(torch.utils.data.DataLoader(ds, batch_size=11, num_workers=1))
    assert batches[0][0].dtype == torch.float32 and batches[0][0].shape == (11, 4, 32, 32)
    assert ds.over_limit()
    assert ImageFiles(str(root), in_chans=4).stand_in().dtype == torch.float32


def test_monitor_is_duck_typed(caplog):
    class Shards:  # another dataset with the bad-file protocol (as a tar-shard reader would have)
        def __init__(self):
            self.bad, self.allowed, self.monitored = torch.zeros(5, dtype=torch.uint8).share_memory_(), 1, False

        def filename(self, i):
            return f"shard-0.tar:{i}.tif"

        def problem(self, i):
            return "4 channels, expected 3 (--in-chans)"

        def over_limit(self):
            return int(self.bad.sum()) > self.allowed

        def limit_error(self):
            return DataError("too many")

    shards = Shards()
    monitor = BadImageMonitor(torch.utils.data.Subset(shards, [0]), [1, 2])
    assert shards.monitored and len(monitor.files) == 1
    shards.bad[3] = 1
    with caplog.at_level("WARNING", logger="fcmae"):
        monitor.poll()
    assert caplog.records[0].getMessage().startswith("skipped unreadable image shard-0.tar:3.tif: 4 channels")
    shards.bad[4] = 1
    with pytest.raises(DataError, match="too many"):
        monitor.poll()


# ------------------------------------------------------------------------------------------------------------------
# transforms and normalisation

def _former_pretrain_transform(size):
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def test_8bit_rgb_normalised_on_the_device_is_the_former_pipeline_bit_for_bit():
    sizes = [(90, 130, 3), (64, 64, 3), (7, 300, 3)]
    photos = [Image.fromarray(RNG.integers(0, 256, s, dtype=np.uint8)) for s in sizes]
    new, old = pretrain_transform((64, 48)), _former_pretrain_transform((64, 48))
    batch, expected = [], []
    for seed in range(12):
        img = photos[seed % 3]
        torch.manual_seed(seed)
        out = new(img)
        after_new = torch.rand(1)
        torch.manual_seed(seed)
        expected.append(old(img))
        assert torch.rand(1) == after_new  # the same random draws
        assert out.dtype == torch.uint8 and out.shape == (3, 64, 48)
        batch.append(out)
        assert torch.equal(normalize(out, IMAGENET_MEAN, IMAGENET_STD), expected[-1])
    batch, expected = torch.stack(batch), torch.stack(expected)
    assert torch.equal(normalize(batch, IMAGENET_MEAN, IMAGENET_STD), expected)  # (N, C, H, W) on the batch
    if torch.cuda.is_available():
        gpu = normalize(batch.cuda(), IMAGENET_MEAN, IMAGENET_STD)
        assert torch.equal(gpu.cpu(), expected)


@pytest.mark.parametrize("source", ["grey", "u8x4", "f32x13"])
def test_pretrain_transform_keeps_channels_and_dtype(source):
    img = {"grey": Image.fromarray(RNG.integers(0, 256, (50, 70), dtype=np.uint8)),
           "u8x4": torch.randint(0, 256, (4, 50, 70), dtype=torch.uint8),
           "f32x13": torch.from_numpy(RNG.uniform(-500, 9000, (13, 50, 70)).astype(np.float32))}[source]
    c, dtype = {"grey": (1, torch.uint8), "u8x4": (4, torch.uint8), "f32x13": (13, torch.float32)}[source]
    torch.manual_seed(0)
    out = pretrain_transform((32, 32))(img)
    after = torch.rand(1)
    assert out.shape == (c, 32, 32) and out.dtype == dtype
    torch.manual_seed(0)
    pretrain_transform((32, 32))(Image.new("RGB", (70, 50)))
    assert torch.rand(1) == after  # the same crop and flip draws as for a PIL image of that size
    if source == "f32x13":
        assert out.min() < 0 and out.max() > 1000  # native units, not scaled
        full = transforms.functional.resized_crop(img, 0, 0, 50, 70, [50, 70], antialias=True)
        assert torch.allclose(full, img, atol=1e-2)  # crop of the whole image at its size: values kept
    before = out.clone()
    y = normalize(out, [0.5] * c, [2.0] * c)
    ref = (out.float() / (255 if dtype == torch.uint8 else 1) - 0.5) / 2
    assert y.dtype == torch.float32 and torch.allclose(y, ref)
    assert torch.equal(out, before)  # normalises a copy in place, never the caller's (float32) tensor


def test_resolve_mean_std():
    assert resolve_mean_std(3) == (IMAGENET_MEAN, IMAGENET_STD)
    assert resolve_mean_std(1) == (GREY_MEAN, GREY_STD)
    assert resolve_mean_std(2, [100, 200], [5, 6.5]) == ((100.0, 200.0), (5.0, 6.5))
    errors = [
        ((4, None, None, None), r"^--in-chans 4 has no default normalisation: pass --mean and --std \(4 values each; "
                                r"compute them with `python -m fcmae.tools.data_stats FOLDER --in-chans 4`\)$"),
        ((1, None, None, HIGH_BIT_DEPTH), "16-bit or float values in their own units"),
        ((4, [0.5] * 3, [1] * 4, None), r"^--mean has 3 values but --in-chans is 4: give one per channel$"),
        ((1, [0.5], [1, 2], None), r"^--std has 2 values but --in-chans is 1"),
        ((2, [0.5] * 2, [1, 0], None), r"^--std values must be > 0, got \[1.0, 0.0\]$"),
        ((2, [0.5] * 2, [1, -3], None), "must be > 0"),
        ((2, [0.5] * 2, [1, float("nan")], None), r"^--std values must be finite"),
        ((2, [float("inf")] * 2, [1, 1], None), r"^--mean values must be finite"),
        ((2, [0.5] * 2, None, None), r"^pass both --mean and --std, not only --mean$"),
        ((0, None, None, None), r"^--in-chans must be >= 1, got 0$"),
    ]
    for (c, mean, std, kind), message in errors:
        with pytest.raises(UsageError, match=message):
            resolve_mean_std(c, mean, std, kind)


def test_fashion_mnist_in_chans():
    try:
        grey = FashionMNIST("val", in_chans=1)
    except DataError:
        pytest.skip("Fashion-MNIST not installed")
    assert grey[0][0].mode == "L" and FashionMNIST("val")[0][0].mode == "RGB"
    assert np.array_equal(np.asarray(grey[0][0]), np.asarray(FashionMNIST("val")[0][0])[..., 0])
    with pytest.raises(UsageError, match=r"Fashion-MNIST is grey: --in-chans 1 .* or 3 .*, not 4"):
        FashionMNIST("val", in_chans=4)
    data = build_datasets(data_path=None, input_size=(32, 32), in_chans=1, val_subset=20, augment=False)
    x = data.val[0][0]
    lo, hi = (0 - GREY_MEAN[0]) / GREY_STD[0], (1 - GREY_MEAN[0]) / GREY_STD[0]  # 8-bit: resized as uint8, clipped
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert lo - 1e-6 <= float(x.min()) <= float(x.max()) <= hi + 1e-6


def test_finetune_rgb_transforms_follow_the_reference():
    def kinds(t):
        return [type(s).__name__ for s in t.transforms]

    assert "ColorJitter" not in kinds(train_transform((64, 64), None, 0.25))  # timm would add ColorJitter(0.4)
    assert "ColorJitter" in kinds(train_transform((64, 64), None, 0.25, color_jitter=0.4))
    assert "RandAugment" in kinds(train_transform((64, 64), "rand-m9-mstd0.5-inc1", 0.25))
    photo = Image.fromarray(RNG.integers(0, 256, (300, 500, 3), dtype=np.uint8))
    big = eval_transform((384, 384))  # the reference: a plain resize to (size, size), no crop
    expected = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(
        transforms.functional.to_tensor(photo.resize((384, 384), Image.BICUBIC)))
    assert torch.equal(big(photo), expected)
    small = eval_transform((224, 224))  # resize the shorter side to 256, centre crop 224
    resize = next(t for t in small.transforms if isinstance(t, transforms.Resize))
    assert resize.size in (256, [256]) and small(photo).shape == (3, 224, 224)
    floats = torch.from_numpy(RNG.uniform(0, 4000, (3, 300, 500)).astype(np.float32))  # 16-bit RGB: tensor path
    assert big(floats).shape == (3, 384, 384) and train_transform((64, 64), None, 0.25)(floats).shape == (3, 64, 64)


def test_finetune_transforms_for_other_channel_counts():
    mean, std = [1000.0] * 4, [500.0] * 4
    img = torch.from_numpy(RNG.uniform(0, 4000, (4, 90, 120)).astype(np.float32))
    train = train_transform((64, 64), None, 1.0, in_chans=4, mean=mean, std=std)
    names = [type(t).__name__ for t in train.transforms]
    assert names == ["AsTensor", "RandomResizedCrop", "RandomHorizontalFlip", "ToFloat", "Normalize", "RandomErasing"]
    out = train(img)
    assert out.shape == (4, 64, 64) and out.dtype == torch.float32
    ev = eval_transform((64, 64), in_chans=4, mean=mean, std=std)
    expected = (transforms.functional.center_crop(transforms.functional.resize(
        img, 73, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True), [64, 64]) - 1000) / 500
    assert torch.allclose(ev(img), expected, atol=1e-5)
    grey = Image.fromarray(RNG.integers(0, 256, (40, 40), dtype=np.uint8))  # 8-bit grey: scaled to 0..1 first
    assert eval_transform((32, 32), in_chans=1)(grey).shape == (1, 32, 32)
    with pytest.raises(UsageError, match=r"^RandAugment's colour operations assume RGB; pass --aa none for "
                                         r"--in-chans 4$"):
        check_channel_options(4, "rand-m9-mstd0.5-inc1")
    with pytest.raises(UsageError, match="leave out --color-jitter for --in-chans 1"):
        check_channel_options(1, None, 0.4)
    with pytest.raises(UsageError, match="pass --aa none for 16-bit or float images"):
        check_channel_options(3, "rand-m9-mstd0.5-inc1", kind=HIGH_BIT_DEPTH)
    check_channel_options(4, "none")
    check_channel_options(3, "rand-m9-mstd0.5-inc1")


def test_build_datasets_for_multiband_tiles(tmp_path):
    for split, n in [("train", 3), ("val", 2)]:
        for c in ["crop", "forest"]:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                tifffile.imwrite(tmp_path / split / c / f"{i}.tif", tile16(4, 48, 48), photometric="minisblack",
                                 planarconfig="contig")
    common = dict(data_path=str(tmp_path), input_size=(32, 32), in_chans=4)
    with pytest.raises(UsageError, match="no default normalisation: pass --mean and --std"):
        build_datasets(**common)
    with pytest.raises(UsageError, match="pass --aa none for --in-chans 4"):
        build_datasets(**common, mean=[3e4] * 4, std=[2e4] * 4, aa="rand-m9-mstd0.5-inc1")
    data = build_datasets(**common, mean=[3e4] * 4, std=[2e4] * 4, aa="none", reprob=0.25, train_subset=4,
                          val_subset=2)
    assert data.classes == ["crop", "forest"] and len(data.train) == 4 and len(data.val) == 2
    x, y = next(iter(torch.utils.data.DataLoader(data.train, batch_size=4)))
    assert x.shape == (4, 4, 32, 32) and x.dtype == torch.float32 and x.abs().max() < 10  # normalised
    assert next(iter(torch.utils.data.DataLoader(data.val, batch_size=2)))[0].shape == (2, 4, 32, 32)
    knn = build_datasets(**common, mean=[3e4] * 4, std=[2e4] * 4, aa="rand-m9-mstd0.5-inc1", augment=False)
    assert knn.train.transform is knn.val.transform  # no augmentation: the colour options do not matter


def test_high_bit_depth_grey_folder_needs_statistics(tmp_path):
    for split in ["train", "val"]:
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(RNG.integers(0, 4096, (40, 40), dtype=np.uint16)).save(tmp_path / split / "a" / "0.png")
    common = dict(data_path=str(tmp_path), input_size=(32, 32), in_chans=1)
    with pytest.raises(UsageError, match="16-bit or float values in their own units"):
        build_datasets(**common)
    data = build_datasets(**common, mean=[2000], std=[1000])
    assert data.val[0][0].shape == (1, 32, 32) and data.val[0][0].dtype == torch.float32
    Image.new("L", (40, 40), 7).save(tmp_path / "val" / "a" / "0.png")  # val now 8-bit: another unit
    with pytest.raises(DataError, match=r"/train holds high-bit-depth images but .*/val 8-bit ones"):
        build_datasets(**common, mean=[2000], std=[1000])


# ------------------------------------------------------------------------------------------------------------------
# fcmae/tools/data_stats.py

def test_data_stats_matches_numpy(tiles, tmp_path, capsys):
    from fcmae.tools.data_stats import channel_stats, main

    root, good = tiles
    pixels = np.concatenate([a.reshape(4, -1) for a in good.values()], axis=1)
    stats = channel_stats(str(root), 4, num_workers=0, max_bad_fraction=0.5)
    assert stats["images"] == 8 and stats["skipped"] == 3
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], pixels.std(axis=1), rtol=1e-10)
    out = tmp_path / "sub" / "stats.yaml"
    with pytest.raises(SystemExit) as e:
        main([str(root), "--in-chans", "4", "--out", str(out), "--max-bad-fraction", "0.5", "--num-workers", "1"])
    assert e.value.code == 0
    written = yaml.safe_load(out.read_text())
    assert written == {"in-chans": 4, "mean": stats["mean"], "std": stats["std"]}
    assert out.read_text().startswith("# 8 high-bit-depth images (in their own units), 3 skipped\n")
    captured = capsys.readouterr()
    assert captured.out.endswith(out.read_text()) and "skipped unreadable image" in captured.err
    with pytest.raises(SystemExit) as e:  # 3 of 11 bad is over 1%
        main([str(root), "--in-chans", "4", "--num-workers", "0"])
    assert e.value.code == 2
    assert re.fullmatch(r"error: 1 of 11 images in \S+ are unreadable \(over --max-bad-fraction 0.01\); first: "
                        r"x1_three.tif .*", capsys.readouterr().err.strip().splitlines()[-1])
    for argv, message in [([str(tmp_path / "none"), "--in-chans", "4"], "error: data folder not found: "),
                          ([str(root), "--in-chans", "0"],
                           "error: argument --in-chans/--in_chans: '0' is not an integer >= 1"),
                          ([str(root)], "error: the following arguments are required: --in-chans")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].startswith(message)


def test_data_stats_8bit_scaled_and_sampled(tmp_path):
    from fcmae.tools.data_stats import channel_stats

    photos = [RNG.integers(0, 256, (20 + 3 * i, 30, 3), dtype=np.uint8) for i in range(6)]
    for i, a in enumerate(photos):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    stats = channel_stats(str(tmp_path), 3, num_workers=0)
    pixels = np.concatenate([a.reshape(-1, 3) for a in photos]) / 255
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], pixels.std(axis=0), rtol=1e-10)
    assert stats["kind"] == "8-bit" and stats["images"] == 6
    sampled = channel_stats(str(tmp_path), 3, max_images=2, num_workers=0, seed=3)
    assert sampled["images"] == 2 and sampled["mean"] != stats["mean"]
