"""--augment-on-device on the CPU (the same code path a GPU runs, decode_jpeg on CPU tensors): the same boxes, flips
and masks as the CPU path for the same (seed, epoch, index); pixels within the resampler's difference of PIL's on
real photos; a mixed batch falls back per kind; an undecodable JPEG counts as bad; exact resume; the option
refused with one line where it cannot apply."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms

from fcmae.data import device_augment
from fcmae.data.device_augment import DeviceAugment, DeviceJpegs, EncodedJpeg, JpegBatch, orient, scaled_box
from fcmae.data.folders import image_folder
from fcmae.data.sampling import EpochLoader, SeededDataset
from fcmae.data.transforms import pretrain_transform
from fcmae.pretrain.cli import main as pretrain
from fcmae.pretrain.data import MaskedImages
from fcmae.runtime import checkpoints as ckpt
from fcmae.runtime.cli import run_cli
from tests.conftest import TINY_PRETRAIN
from tools.bench_loader import make_jpegs, photos

pytestmark = pytest.mark.usefixtures("one_thread")


def photo(height, width, k=0):
    return np.asarray(Image.fromarray(photos()[k % 3]).resize((width, height), Image.BICUBIC))


def save_jpeg(path, array, mode="RGB", **kwargs):
    img = Image.fromarray(array)
    img = img.convert(mode) if mode != img.mode else img
    img.save(path, "JPEG", quality=90, **kwargs)


def with_orientation(path, array, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, "JPEG", quality=90, exif=exif)


def both_paths(folder, input_size, in_chans=3):
    """(CPU path, device path) datasets of the folder, seeded alike, and the device path's DeviceAugment."""
    files_cpu, files_dev = (image_folder(str(folder), transform=pretrain_transform(input_size),
                                         input_size=input_size, in_chans=in_chans, max_bad_fraction=0.5)
                            for _ in range(2))
    jpegs = DeviceJpegs(files_dev)
    cpu = SeededDataset(MaskedImages(files_cpu, 4, 0.5), seed=3, rngs=("torch",))
    dev = SeededDataset(MaskedImages(jpegs, 4, 0.5), seed=3, rngs=("torch",))
    return cpu, dev, DeviceAugment(input_size, in_chans, files_dev)


def test_orientation_matches_pil_exif_transpose():
    a = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG", exif=exif)  # lossless, so the pixels compare exactly
        upright = np.asarray(ImageOps.exif_transpose(Image.open(buf)))
        ours = orient(torch.from_numpy(a).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
        assert np.array_equal(ours, upright), orientation


def test_same_boxes_flips_and_masks_as_the_cpu_path(tmp_path, monkeypatch):
    """Input 64 decodes JPEGs of 256+ px a side at a reduced scale on the CPU path: sizes on both sides of that,
    one rotated by EXIF and one grey. The crop parameters are drawn with the same calls on the same sizes, the
    device's boxes are those scaled by the reduced decoding's factor, the masks (drawn after the crop and flip)
    are equal, and the pixels agree (a flip drawn differently would differ by tens of grey levels)."""
    shapes = [(60, 80), (250, 200), (300, 260), (600, 520), (1100, 1030)]
    for k, (h, w) in enumerate(shapes):
        save_jpeg(tmp_path / f"{k}.jpg", photo(h, w, k))
    with_orientation(tmp_path / "rotated.jpg", photo(600, 380, 1), 6)
    save_jpeg(tmp_path / "grey.jpg", photo(90, 120, 2), mode="L")
    cpu, dev, augment = both_paths(tmp_path, (64, 64))
    drawn = []
    get_params = transforms.RandomResizedCrop.get_params

    def recording(img, scale, ratio):
        box = get_params(img, scale, ratio)
        drawn.append((tuple(transforms.functional.get_dimensions(img)[1:]), box))
        return box

    monkeypatch.setattr(transforms.RandomResizedCrop, "get_params", staticmethod(recording))
    keys = [(epoch, i) for epoch in (0, 1) for i in range(len(cpu))]
    cpu_samples = [cpu[key] for key in keys]
    cpu_drawn, drawn[:] = list(drawn), []
    dev_samples = [dev[key] for key in keys]
    assert drawn == cpu_drawn and len(drawn) == len(keys)
    files = dev.dataset.dataset.dataset
    scales = set()
    for (size, box), (sample, mask), (cpu_img, cpu_mask), (epoch, i) in zip(drawn, dev_samples, cpu_samples, keys):
        assert isinstance(sample, EncodedJpeg) and torch.equal(mask, cpu_mask)
        full = Image.open(files.filename(i)).size[::-1]
        if sample.orientation == 6:
            full = full[::-1]
        scale = round(full[0] / size[0] + 0.49)  # the drafted size was rounded up
        scales.add(scale)
        assert sample.box == scaled_box(box, scale, full), (files.filename(i), size, box, sample.box)
        out = augment(JpegBatch.of([sample]))[0]
        assert (out.float() - cpu_img.float()).abs().mean() < 4, files.filename(i)
    assert scales == {1, 2, 4, 8}


def test_pixels_match_the_pil_path_on_real_photos(tmp_path):
    """scikit-image's photos as JPEGs of 500x375 (ImageNet-like: no reduced decoding at 224, so the boxes are
    equal and only the resampler differs: PIL's bicubic in fixed point against torch's antialiased bicubic) and
    2000x1500 (decoded at half size on the CPU path, at full size on the device). Measured on this machine: mean
    absolute difference 0.18 and 0.20 grey levels, largest 7, about 1 pixel value in 100,000 off by more than 2
    at 500x375."""
    for size, count in (((500, 375), 12), ((2000, 1500), 3)):
        folder = tmp_path / f"{size[0]}"
        make_jpegs(str(folder), count, size, classes=1)
        cpu, dev, augment = both_paths(folder, (224, 224))
        a = torch.stack([cpu[i][0] for i in range(count)]).float()
        b = augment(JpegBatch.of([dev[i][0] for i in range(count)])).float()
        diff = (a - b).abs()
        assert diff.mean() < 0.3 and diff.mean((1, 2, 3)).max() < 0.4, (size, diff.mean((1, 2, 3)))
        assert (diff > 2).float().mean() < 1e-3 and diff.max() <= 16, (size, diff.max())


def mixed_folder(folder):
    """One file of each kind an 8-bit RGB data set may hold: the device takes the plain JPEGs (RGB, grey,
    EXIF-rotated, progressive); the CPU path the CMYK JPEG, the PNGs (RGB, RGBA), a 16-bit grey TIFF (scaled to
    8 bits by the photo rules), an 8-bit .npy and a truncated JPEG (unreadable: skipped, counted)."""
    import tifffile

    save_jpeg(folder / "a_rgb.jpg", photo(70, 90, 0))
    save_jpeg(folder / "b_grey.jpg", photo(80, 64, 1), mode="L")
    with_orientation(folder / "c_rotated.jpg", photo(50, 110, 2), 6)
    save_jpeg(folder / "d_progressive.jpg", photo(96, 72, 0), progressive=True)
    save_jpeg(folder / "e_cmyk.jpg", photo(64, 64, 1), mode="CMYK")
    Image.fromarray(photo(66, 77, 2)).save(folder / "f_rgb.png")
    Image.fromarray(np.dstack([photo(60, 60, 0), np.full((60, 60), 128, np.uint8)])).save(folder / "g_rgba.png")
    tifffile.imwrite(folder / "h_grey16.tif", (photo(64, 80, 1)[..., 0].astype(np.uint16) * 257))
    np.save(folder / "i_rgb.npy", photo(64, 64, 2))
    data = (folder / "a_rgb.jpg").read_bytes()
    (folder / "j_truncated.jpg").write_bytes(data[:len(data) // 2])
    save_jpeg(folder / "k_rgb.jpg", photo(64, 96, 1))


ON_DEVICE = {"a_rgb.jpg", "b_grey.jpg", "c_rotated.jpg", "d_progressive.jpg", "k_rgb.jpg"}


@pytest.mark.parametrize("workers", [0, 1])
def test_mixed_batch_falls_back_per_kind(tmp_path, workers):
    """The loader's batches (all 11 files, one batch; with a worker process the JpegBatch crosses processes): the
    CPU path's images bit for bit where the device path falls back, within the resampler's difference where it
    decodes on the device; the truncated file is skipped and counted alike on both paths."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    mixed_folder(folder)
    cpu, dev, augment = both_paths(folder, (64, 64))
    loaders = [EpochLoader(data.dataset, seed=3, rank=0, world_size=1, batch_size=11, num_workers=n,
                           rngs=("torch",), collate_fn=collate)
               for data, n, collate in ((cpu, 0, None), (dev, workers, device_augment.collate_pairs))]
    (cpu_imgs, cpu_masks), (batch, masks) = (next(loader.epoch(1)) for loader in loaders)
    files = dev.dataset.dataset.dataset
    names = [os.path.basename(files.filename(i)) for i in batch.indices.tolist()]
    assert set(names) == ON_DEVICE and torch.equal(masks, cpu_masks)
    imgs = augment(batch)
    assert imgs.dtype == torch.uint8 and imgs.shape == cpu_imgs.shape == (11, 3, 64, 64)
    for k in range(11):
        if k in batch.decoded_at.tolist():
            assert torch.equal(imgs[k], cpu_imgs[k]), k
        else:
            assert (imgs[k].float() - cpu_imgs[k].float()).abs().mean() < 1.5, k
    bad = [os.path.basename(f.filename(i)) for f in (cpu.dataset.dataset, files) for i in f.bad_indices()]
    assert bad == ["j_truncated.jpg", "j_truncated.jpg"]


def test_grey_jpegs_on_the_device_with_one_channel(tmp_path):
    save_jpeg(tmp_path / "grey.jpg", photo(70, 90, 0), mode="L")
    save_jpeg(tmp_path / "rgb.jpg", photo(70, 90, 1))  # three channels: unreadable with --in-chans 1
    Image.fromarray(photo(60, 50, 2)[..., 0]).save(tmp_path / "grey.png")
    cpu, dev, augment = both_paths(tmp_path, (32, 32), in_chans=1)
    samples = [dev[i][0] for i in range(3)]
    assert [isinstance(s, EncodedJpeg) for s in samples] == [True, False, False]
    imgs = augment(JpegBatch.of(samples))
    expected = torch.stack([cpu[i][0] for i in range(3)])
    assert imgs.shape == (3, 1, 32, 32) and torch.equal(imgs[1:], expected[1:])
    assert (imgs[0].float() - expected[0].float()).abs().mean() < 1.5
    # rgb.jpg (the last in order) is unreadable: replaced by the next file, grey.jpg, decoded on the CPU as before
    assert dev.dataset.dataset.dataset.bad_indices() == [2]


def test_a_jpeg_no_decoder_reads_is_marked_bad(tmp_path, monkeypatch):
    """A JPEG whose header passes but whose data the decoders reject: marked bad in the main process (the monitor
    counts it against --max-bad-fraction) and a mean-valued image stands in for it in this step."""
    import torchvision.io

    for k in range(3):
        save_jpeg(tmp_path / f"{k}.jpg", photo(40, 50, k))
    _, dev, augment = both_paths(tmp_path, (32, 32))
    samples = [dev[i][0] for i in range(3)]
    poisoned = samples[1].data
    decode_jpeg = torchvision.io.decode_jpeg

    def failing(data, *args, **kwargs):
        if any(bytes(d.numpy()) == poisoned for d in (data if isinstance(data, list) else [data])):
            raise RuntimeError("Corrupt JPEG data (as a decoder would say)")
        return decode_jpeg(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", failing)
    imgs = augment(JpegBatch.of(samples))
    files = dev.dataset.dataset.dataset
    assert files.bad_indices() == [1]
    assert torch.equal(imgs[1], torch.tensor([124, 116, 104], dtype=torch.uint8).reshape(3, 1, 1).expand(3, 32, 32))
    assert imgs[0].float().std() > 5 and imgs[2].float().std() > 5


PRETRAIN = TINY_PRETRAIN + ["--input-size", "64", "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0",
                            "--log-every", "1", "--blr", "1e-3", "--knn-every-epochs", "0", "--device", "cpu",
                            "--augment-on-device"]


def test_resume_is_exact_with_augment_on_device(tmp_path):
    """4 steps in one go (no worker process) equal 2 steps, then 2 more after a resume with a worker process."""
    data = tmp_path / "data"
    data.mkdir()
    for k in range(15):
        save_jpeg(data / f"{k:02d}.jpg", photo(70 + 3 * k, 90, k))
    Image.fromarray(photo(80, 80, 1)).save(data / "png.png")  # one CPU-path sample in the mix

    def run(out, steps, workers):
        pretrain(PRETRAIN + ["--data-path", str(data), "--output-dir", str(out), "--max-steps", str(steps),
                             "--num-workers", str(workers)])
        return ckpt.latest_loadable(str(out))[1]

    full = run(tmp_path / "full", 4, 0)
    run(tmp_path / "cut", 2, 0)
    resumed = run(tmp_path / "cut", 4, 1)
    assert resumed["history"] == full["history"]
    for key, value in full["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def test_refused_where_it_cannot_apply(tmp_path, capsys):
    import tifffile

    pngs, deep = tmp_path / "pngs", tmp_path / "deep"
    for folder in (pngs, deep):
        folder.mkdir()
    Image.fromarray(photo(40, 40)).save(pngs / "a.png")
    tifffile.imwrite(deep / "a.tif", photo(40, 40).astype(np.uint16) * 257)  # 16-bit RGB: kept in native units
    out = tmp_path / "out"
    cases = [([], "give --data-path"),
             (["--data-path", str(pngs), "--in-chans", "4", "--mean", "0", "0", "0", "0", "--std", "1", "1", "1", "1"],
              "with --in-chans 4"),
             (["--data-path", str(pngs)], "has no .jpg or .jpeg files"),
             (["--data-path", str(deep), "--mean", "0", "0", "0", "--std", "1", "1", "1"], "16-bit or float values")]
    for extra, message in cases:
        assert run_cli(pretrain, PRETRAIN + ["--output-dir", str(out)] + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert not out.exists()


def test_shards_go_to_the_device_as_the_folder_does(tmp_path):
    """The same files in tar shards (TarShards.read_bytes): the same samples, JPEG bytes, boxes and flips."""
    from fcmae.data.shards import open_dataset
    from fcmae.tools.make_shards import make_shards

    folder = tmp_path / "photos"
    folder.mkdir()
    for k in range(5):
        save_jpeg(folder / f"{k}.jpg", photo(60 + 40 * k, 90, k))
    Image.fromarray(photo(64, 64)).save(folder / "5.png")
    make_shards(str(folder), str(tmp_path / "shards"), shard_size=30_000, progress=lambda line: None)
    views = [SeededDataset(DeviceJpegs(open_dataset(str(path), transform=pretrain_transform((64, 64)),
                                                    input_size=(64, 64))), seed=1, rngs=("torch",))
             for path in (folder, tmp_path / "shards")]
    for i in range(6):
        a, b = (view[(2, i)][0] for view in views)
        assert type(a) is type(b) and (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), i
    assert sum(isinstance(views[1][i][0], EncodedJpeg) for i in range(6)) == 5
