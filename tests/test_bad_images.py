"""Image folders with bad and unusual files (fcmae/data/decode.py, fcmae/data/bad_samples.py): every convertible kind decodes to the expected RGB
pixels, every unreadable kind is skipped for the next index that loads and reported once, and both CLIs stop with
one line (exit code 2, no checkpoint after the failure) past --max-bad-fraction or at the first with --bad-image
error, also when the files are read by DataLoader worker processes."""
import io
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fcmae.data import decode
from fcmae.data.bad_samples import BadImageMonitor
from fcmae.data.decode import MEAN_RGB, load_rgb, to_rgb
from fcmae.data.folders import ImageFiles
from fcmae.runtime.errors import DataError
from fcmae.data.sampling import EpochSampler
from fcmae.data.transforms import pretrain_transform

RNG = np.random.default_rng(0)
N = 30  # files in the zoo
# index -> (name, expected reason) of the unreadable ones
BAD = {4: ("04_empty.jpg", "empty file"), 6: ("06_trunc.jpg", "truncated"), 7: ("07_trunc.png", "truncated"),
       11: ("11_random.jpg", "not an image"), 12: ("12_text.png", "not an image"),
       16: ("16_svg.png", "not an image"), 19: ("19_bomb.png", "pixels"), 22: ("22_corrupt.png", "broken data"),
       29: ("29_appledouble.jpg", "not an image")}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _encoded(img, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A flat folder of 30 small files (natural order = the index in the names), 9 of them unreadable."""
    root = tmp_path_factory.mktemp("zoo")
    noise = Image.fromarray(RNG.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    jpeg, png = _encoded(noise, "JPEG"), _encoded(noise, "PNG")
    ramp16 = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    rgba = np.zeros((8, 12, 4), np.uint8)
    rgba[:, 4:8] = (0, 0, 0, 128)  # half-transparent black
    rgba[:, 8:] = (255, 0, 0, 255)  # opaque red; columns 0..3 fully transparent
    la = np.full((8, 8, 2), 200, np.uint8)
    la[:, :, 1] = 255
    la[:4, :, 1] = 0  # top half transparent
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    palette.putpalette([0, 0, 255, 255, 0, 0])
    rotated = Image.new("RGB", (40, 20), (255, 0, 0))
    rotated.paste((0, 255, 0), (20, 0, 40, 20))  # stored: red left, green right
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    frames = [Image.new("RGB", (10, 10), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    large = Image.new("RGB", (2048, 1536), (30, 60, 200))
    bomb = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)) \
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 100)) + _png_chunk(b"IEND", b"")
    corrupt = bytearray(png)
    corrupt[len(png) // 2] ^= 0xFF
    files = {
        "00_rgb.jpg": jpeg, "01_gray.png": Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))),
        "02_bilevel.png": Image.fromarray(np.eye(8, dtype=bool)), "03_gray16.png": Image.fromarray(ramp16),
        "04_empty.jpg": b"",
        "05_int32.tif": Image.fromarray(np.linspace(-1000, 199000, 64).astype(np.int32).reshape(1, 64)),
        "06_trunc.jpg": jpeg[: len(jpeg) // 2], "07_trunc.png": png[: len(png) // 2],
        "08_float.tif": Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 64)),
        "09_float_wide.tif": Image.fromarray(np.linspace(-5, 20, 64, dtype=np.float32).reshape(1, 64)),
        "10_cmyk.jpg": Image.new("CMYK", (16, 16), (0, 255, 255, 0)),
        "11_random.jpg": RNG.bytes(600), "12_text.png": b"not an image\n" * 20,
        "13_palette_trns.png": (palette, {"transparency": 0}),
        "14_rgba.png": Image.fromarray(rgba), "15_la.png": Image.fromarray(la, "LA"),
        "16_svg.png": b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>',
        "17_anim.gif": (frames[0], {"save_all": True, "append_images": frames[1:], "duration": 50, "loop": 0}),
        "18_exif_rot.jpg": (rotated, {"exif": exif}), "19_bomb.png": bomb,
        "20_tiny.png": Image.new("RGB", (1, 1), (10, 20, 30)), "21_tall.png": Image.new("RGB", (1, 300), (9, 9, 9)),
        "22_corrupt.png": bytes(corrupt), "23_large.jpg": large, "24_wide.png": Image.new("L", (300, 1), 77),
        "25_int16range.tif": Image.fromarray(np.linspace(0, 65535, 64).astype(np.int32).reshape(1, 64)),
        "26_UPPER.JPG": jpeg, "27_rgb.bmp": noise, "28_rgb.webp": (noise, {"lossless": True}),
        "29_appledouble.jpg": b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\0" * 64,
    }
    for name, content in files.items():
        if isinstance(content, bytes):
            (root / name).write_bytes(content)
        else:
            img, kw = content if isinstance(content, tuple) else (content, {})
            img.save(root / name, **kw)
    (root / "30_folder.jpg").mkdir()  # a directory with an image name is not listed
    (root / "notes.txt").write_text("not listed either")
    assert len(files) == N
    return root


def _next_loadable(i):
    while i in BAD:
        i = (i + 1) % N
    return i


def test_listing(zoo):
    ds = ImageFiles(str(zoo))
    assert [p.rsplit("/", 1)[1] for p, _ in ds.samples][:3] == ["00_rgb.jpg", "01_gray.png", "02_bilevel.png"]
    names = [p.rsplit("/", 1)[1] for p, _ in ds.samples]
    assert len(ds) == N and names[26] == "26_UPPER.JPG" and "30_folder.jpg" not in names
    assert ds.class_to_idx == {"": 0} and ds.filename(5).endswith("05_int32.tif")
    with pytest.raises(DataError, match="data folder not found"):
        ImageFiles(str(zoo / "missing"))
    with pytest.raises(DataError, match="no images found"):
        ImageFiles(str(zoo / "30_folder.jpg"))


def test_conversions(zoo):
    def px(name, **kw):
        img = load_rgb(str(zoo / name), **kw)
        assert img.mode == "RGB"
        return np.asarray(img).astype(int)

    assert px("00_rgb.jpg").shape == (48, 64, 3)
    gray = px("01_gray.png")
    assert (gray[..., 0] == gray[..., 2]).all() and gray[0, 1, 0] == 4
    assert set(np.unique(px("02_bilevel.png"))) == {0, 255}
    ramp = px("03_gray16.png")[0, :, 0]  # 65535 -> 255, not clipped (PIL's convert makes nearly all of it 255)
    assert ramp[0] == 0 and ramp[-1] == 255 and ramp[128] == 128 and (np.diff(ramp) >= 0).all()
    assert len(np.unique(ramp)) == 256
    for name in ["05_int32.tif", "09_float_wide.tif"]:  # outside 16-bit / [0, 1]: stretched min..max
        row = px(name)[0, :, 0]
        assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all()
    assert px("25_int16range.tif")[0, -1, 0] == 255 and px("25_int16range.tif")[0, 32, 0] == round(33288 / 257)
    row = px("08_float.tif")[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and row[32] == round(32 / 63 * 255)
    cmyk = px("10_cmyk.jpg")[8, 8]
    assert cmyk[0] > 240 and cmyk[1] < 15 and cmyk[2] < 15
    pal = px("13_palette_trns.png")
    assert tuple(pal[0, 0]) == MEAN_RGB and tuple(pal[0, 1]) == (255, 0, 0)
    rgba = px("14_rgba.png")
    assert tuple(rgba[0, 0]) == MEAN_RGB and tuple(rgba[0, 10]) == (255, 0, 0)
    assert np.abs(rgba[0, 5] - np.array(MEAN_RGB) * 127 / 255).max() <= 1  # alpha 128 over the mean colour
    la = px("15_la.png")
    assert tuple(la[0, 0]) == MEAN_RGB and tuple(la[7, 0]) == (200, 200, 200)
    gif = px("17_anim.gif")  # the first frame
    assert gif.shape == (10, 10, 3) and gif[5, 5, 0] > 240 and gif[5, 5, 1] < 15
    rot = px("18_exif_rot.jpg")  # stored 40 wide, shown 20 wide and 40 tall with the left (red) half on top
    assert rot.shape == (40, 20, 3) and rot[5, 10, 0] > 200 and rot[35, 10, 1] > 200 and rot[35, 10, 0] < 50
    assert px("20_tiny.png").shape == (1, 1, 3) and px("21_tall.png").shape == (300, 1, 3)
    assert tuple(px("24_wide.png")[0, 0]) == (77, 77, 77)
    assert px("23_large.jpg").shape == (1536, 2048, 3)
    small = px("23_large.jpg", draft_side=128)  # libjpeg's 1/8 scale: both sides still >= 128
    assert small.shape == (192, 256, 3) and np.abs(small[96, 128] - [30, 60, 200]).max() <= 3
    assert np.array_equal(px("28_rgb.webp"), px("27_rgb.bmp"))


@pytest.mark.parametrize("mode,value,expected", [
    ("YCbCr", (76, 85, 255), (254, 0, 0)), ("LAB", (136, 208, 195), (250, 3, 11)), ("HSV", (0, 255, 255), (255, 0, 0)),
    ("PA", (0, 0), MEAN_RGB), ("RGBa", (0, 0, 0, 0), MEAN_RGB), ("I;16B", 65535, (255, 255, 255)),
    ("I", -7, (0, 0, 0)), ("F", float("nan"), (0, 0, 0)),
])
def test_modes_without_a_file(mode, value, expected):
    assert to_rgb(Image.new(mode, (2, 2), value)).getpixel((1, 1)) == expected


def test_unreadable_files_are_skipped_for_the_next_that_loads(zoo):
    ds = ImageFiles(str(zoo), input_size=64, max_bad_fraction=0.5)
    for i in range(N):
        img, target = ds[i]
        j = _next_loadable(i)  # 29 (the last) wraps around to 0
        assert np.array_equal(np.asarray(img), np.asarray(load_rgb(ds.filename(j), ds.draft_side))), (i, j)
        assert target == 0
    assert ds.bad_indices() == sorted(BAD)
    for i, (name, reason) in BAD.items():
        assert ds.filename(i).endswith(name) and reason in ds.problem(i), (name, ds.problem(i))
    assert ds[23][0].size == (256, 192)  # decoded at 1/8: 2x the input size is enough


def test_vanished_file_and_pixel_limit(tmp_path, zoo, monkeypatch):
    for name in "abc":
        Image.new("RGB", (4, 4), (ord(name), 0, 0)).save(tmp_path / f"{name}.png")
    ds = ImageFiles(str(tmp_path), max_bad_fraction=0.5)
    (tmp_path / "b.png").unlink()  # removed after listing
    assert ds[1][0].getpixel((0, 0)) == (ord("c"), 0, 0) and "file not found" in ds.problem(1)
    monkeypatch.setattr(decode, "MAX_PIXELS", 1_000_000)
    assert "2048x1536 = 3145728 pixels, over the limit of 1000000" in ImageFiles(str(zoo)).problem(23)


def test_tiny_images_through_the_transforms(zoo):
    from fcmae.data.transforms import eval_transform, train_transform

    for name in ["20_tiny.png", "21_tall.png", "24_wide.png"]:
        img = load_rgb(str(zoo / name))
        for transform in [pretrain_transform((64, 64)), train_transform((64, 64), "rand-m9-mstd0.5-inc1", 0.25),
                          eval_transform((64, 64))]:
            out = transform(img)
            assert out.shape == (3, 64, 64) and torch.isfinite(out).all()


def test_monitor_logs_once_and_stops_past_the_limit(zoo, caplog):
    ds = ImageFiles(str(zoo), max_bad_fraction=0.1)  # 3 of 30 allowed
    monitor = BadImageMonitor(torch.utils.data.Subset(ds, range(N)), [1, 2])  # looks into wrappers, skips the list
    for i in range(8):
        ds[i]
    with caplog.at_level("WARNING", logger="fcmae"):
        monitor.poll()
        monitor.poll()
    assert [r.getMessage().split(":")[0] for r in caplog.records] == \
        [f"skipped unreadable image {ds.filename(i)}" for i in (4, 6, 7)]
    ds.bad[11] = 1  # as a worker process would mark it
    with pytest.raises(DataError, match=r"^4 of 30 images in .* are unreadable \(over --max-bad-fraction 0.1\); "
                                        r"first: 04_empty.jpg \(empty file\), 06_trunc.jpg \(image file is truncated "
                                        r".*\) and 1 more; remove or fix them, or raise --max-bad-fraction$"):
        monitor.poll()
    with pytest.raises(DataError, match="^5 of 30 images"):  # in the main process the dataset raises it at once
        ds[12]
    err = ImageFiles(str(zoo), bad_image="error")
    with pytest.raises(DataError, match=r"^unreadable image .*/04_empty.jpg: empty file \(--bad-image error"):
        err[4]


# ------------------------------------------------------------------------------------------------------------------
# The CLIs end to end

PRETRAIN = ["--input-size", "64", "--batch-size", "2", "--epochs", "1", "--warmup-epochs", "0", "--log-every", "50",
            "--save-every-steps", "1", "--keep-checkpoints", "1"]


def _pretrain(zoo, out, *extra):
    from fcmae.pretrain.cli import cli

    with pytest.raises(SystemExit) as e:
        cli(PRETRAIN + ["--data-path", str(zoo), "--output-dir", str(out)] + list(extra))
    return e.value.code


def _checkpoint_steps(out):
    return [int(p.stem.split("-")[1]) for p in out.glob("checkpoint-*.pth")]


PADDING = 40


@pytest.fixture(scope="module")
def padded(tmp_path_factory, zoo):
    """40 good files, then the 9 unreadable ones: the pretraining CLI reads the first few dozen images in the main
    process before training (reconstruction and collapse-monitor images), so these are met in the seeded order."""
    root = tmp_path_factory.mktemp("padded")
    for i in range(PADDING):
        Image.fromarray(RNG.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / f"a{i:03}.png")
    for name, _ in BAD.values():
        (root / f"z{name}").write_bytes((zoo / name).read_bytes())
    order = EpochSampler(PADDING + len(BAD), seed=0).indices()
    first = next(p for p, i in enumerate(order) if i >= PADDING)  # sample position of the first bad file met
    name = sorted(f"z{n}" for n, _ in BAD.values())[order[first] - PADDING]
    assert first // 2 >= 1  # (seed 0: the 3rd sample) so a step of 2 images comes before the failure
    return root, first // 2, name


def test_pretrain_skips_and_logs_every_bad_file_once(zoo, tmp_path):
    out = tmp_path / "out"
    assert _pretrain(zoo, out, "--num-workers", "0", "--max-bad-fraction", "0.5", "--batch-size", "10",
                     "--save-every-steps", "3") == 0
    assert _checkpoint_steps(out) == [3]  # 30 images, 3 steps of 10: every file visited
    log = (out / "log.txt").read_text()
    for name, _ in BAD.values():
        assert len(re.findall(rf"skipped unreadable image \S*/{name}: ", log)) == 1, name
    assert log.count("skipped unreadable image") == len(BAD)


def test_bad_image_error_stops_at_the_first_with_one_line(padded, tmp_path, capsys):
    root, steps_before, name = padded
    assert _pretrain(root, tmp_path, "--num-workers", "0", "--bad-image", "error") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: unreadable image {root}/{name}: ")
    assert dict(BAD.values())[name[1:]] in err[-1]  # its reason
    assert err[-1].endswith("(--bad-image error stops at the first; --bad-image skip skips up to --max-bad-fraction "
                            "of them)")
    assert _checkpoint_steps(tmp_path) == [steps_before]  # nothing saved after the failure
    assert not (tmp_path / "metrics.json").exists()


def test_worker_processes_mark_bad_files_for_the_main_process(zoo, padded, tmp_path, capsys, caplog):
    """Marks made in 2 DataLoader workers reach the main process, which reads no file itself: every bad file is
    logged once. Past the limit an unmonitored dataset's worker raises; the CLI (monitored) stops with one line,
    not a worker traceback, before the batch that holds the bad file is trained on."""
    ds = ImageFiles(str(zoo), transform=pretrain_transform((64, 64)), max_bad_fraction=0.5)
    monitor = BadImageMonitor(ds)
    for _ in torch.utils.data.DataLoader(ds, batch_size=10, num_workers=2):
        pass
    with caplog.at_level("WARNING", logger="fcmae"):
        monitor.poll()
    assert sorted(r.getMessage().split(":")[0] for r in caplog.records) == \
        sorted(f"skipped unreadable image {zoo}/{name}" for name, _ in BAD.values())
    unmonitored = ImageFiles(str(zoo), transform=pretrain_transform((64, 64)))  # nobody polls: workers raise
    with pytest.raises(DataError, match="unreadable"):
        for _ in torch.utils.data.DataLoader(unmonitored, batch_size=10, num_workers=2):
            pass
    root, steps_before, _ = padded
    capsys.readouterr()
    assert _pretrain(root, tmp_path, "--num-workers", "2") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.fullmatch(rf"error: \d of 49 images in {root} are unreadable \(over --max-bad-fraction 0.01\); first: "
                        r"z[^;]+; remove or fix them, or raise --max-bad-fraction", err.strip().splitlines()[-1])
    assert max(_checkpoint_steps(tmp_path), default=0) <= steps_before  # workers may run ahead


def test_finetune_with_a_bad_file_in_train_and_val(tmp_path, capsys):
    from finetune.cli import main

    root = tmp_path / "data"
    for split, n in [("train", 4), ("val", 2)]:
        for c in ["cat", "dog"]:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(RNG.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    (root / "train" / "cat" / "0.png").write_bytes(b"")  # train: 8 files, one empty
    (root / "val" / "dog" / "9.jpg").write_bytes(b"GIF89a")  # val: 5 files, one a bare GIF header
    common = ["--data-path", str(root), "--input-size", "32", "--batch-size", "4", "--num-workers", "0", "--epochs",
              "1", "--no-model-ema", "--log-every", "50"]
    with pytest.raises(SystemExit) as e:
        main(common + ["--max-bad-fraction", "0.5", "--output-dir", str(tmp_path / "ok")])
    assert e.value.code == 0
    log = (tmp_path / "ok" / "log.txt").read_text()
    assert log.count(f"skipped unreadable image {root}/train/cat/0.png: empty file") == 1
    assert log.count(f"skipped unreadable image {root}/val/dog/9.jpg: ") == 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(common + ["--output-dir", str(tmp_path / "capped")])
    assert e.value.code == 2
    # the validation files are read before training starts, so their problem stops the run first, at once
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: 1 of 5 images in {root}/val are unreadable (over --max-bad-fraction 0.01); "
                           "first: dog/9.jpg (")
    assert not list((tmp_path / "capped").glob("checkpoint-*.pth"))
    (root / "val" / "dog" / "9.jpg").unlink()  # a clean validation set: the train file's problem stops the run
    with pytest.raises(SystemExit) as e:
        main(common + ["--output-dir", str(tmp_path / "capped2")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"error: 1 of 8 images in {root}/train are unreadable (over --max-bad-fraction 0.01); first: cat/0.png " \
        "(empty file); remove or fix them, or raise --max-bad-fraction"
    assert not list((tmp_path / "capped2").glob("checkpoint-*.pth"))


@pytest.mark.parametrize("cli", ["fcmae.pretrain.cli", "finetune.cli"])
@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_max_bad_fraction_is_checked(cli, value, tmp_path, capsys):
    import importlib

    entry = importlib.import_module(cli)
    with pytest.raises(SystemExit) as e:
        (entry.cli if cli == "fcmae.pretrain.cli" else entry.main)(["--max-bad-fraction", value, "--output-dir",
                                                                str(tmp_path / "out")])
    assert e.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and "--max-bad-fraction" in last_line and value in last_line, last_line
    assert not (tmp_path / "out").exists()
