"""Input-pipeline benchmark: images/s of the pretraining loader against the reference recipe's, side by side.

    python -m tools.bench_loader --data FOLDER_OR_SHARDS [--baseline-data FOLDER] [--workers 0 1 2]
        [--batch-size 64] [--input-size 224] [--rounds 3] [--batches N] [--threads 1] [--augment-on-device]
        [--json PATH] [--profile N]
    python -m tools.bench_loader --make-jpegs DIR --count N --size WxH [--classes 10] [--seed 0]

"ours": the loader the pretraining loop uses: the dataset of --data (image folder or tar shards, fcmae.data.shards.
open_dataset) with fcmae.data.transforms.pretrain_transform, masks (MaskedImages), per-sample seeding (SeededDataset, torch's
CPU generator only), EpochSampler and the one persistent DataLoader of fcmae.data.sampling.make_loader, its uint8 batches
normalised by fcmae.data.normalization.normalize on --device. With --device cpu also "ours_loader": the same without that
normalisation, which a GPU run does on the GPU (what the loader alone delivers; on a CPU the normalisation takes
main-process CPU time that a GPU run does not spend). "baseline": the reference recipe's: torchvision ImageFolder +
RandomResizedCrop(scale 0.2-1, bicubic) + flip + ToTensor + Normalize, a shuffling DataLoader with the same workers
and batch, built once (its workers restart each epoch, as in the reference). Each round is one epoch of each (or
--batches batches), the order alternating (ABC, CBA, ...), after one warm-up epoch of each; per-round rates, median
and min, and the ratio to the baseline (of the medians, and the median of the per-round ratios) are printed per
worker count. With --augment-on-device also "ours_device": the pretraining loader with --augment-on-device (the
workers read JPEG bytes and draw boxes, flips and masks; decoding, crop, resize, flip and normalisation run on
--device, in this process: fcmae.data.device_augment). This process runs torch with --threads threads (default
1). --json is rewritten after each worker count ("complete": false until the last), so a run cut short keeps
what it measured.

--profile N: milliseconds per sample of each stage, in this process, over N files of --baseline-data (or
--data): reading, decoding (ours: reduced-scale JPEG decoding), each transform step, mask, seeding, and the
collate of a batch (float32 vs uint8).

--make-jpegs: N JPEGs (quality 90) of WxH made from scikit-image's bundled colour photos (random crops, flips,
slight noise so no two files are alike), in --classes class subfolders, for a benchmark on a fresh machine:
`--size 500x375` is ImageNet-like, `--size 2000x1500` a large photo.
"""
import io
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageOps

from fcmae.runtime.cli import check_writable_dir, run_cli
from fcmae.runtime.errors import UsageError
from fcmae.runtime.files import write_text
from fcmae.runtime.options import ArgParser, Device, Int, Str, add, parse_with_config
from fcmae.runtime.options import input_size as parse_input_size

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle", "colorwheel")


# ---------------------------------------------------------------- test images


def photos():
    """scikit-image's bundled colour photos as RGB uint8 arrays (those that need a download are skipped)."""
    from skimage import data as skdata

    out = []
    for name in PHOTOS:
        try:
            img = getattr(skdata, name)()
        except Exception:  # not bundled in this version (a pooch download)
            continue
        img = img[0] if isinstance(img, tuple) else img
        if img.ndim == 3 and img.shape[2] >= 3:
            out.append(np.ascontiguousarray(img[:, :, :3]))
    return out


def make_jpegs(folder: str, count: int, size, classes: int = 10, seed: int = 0, quality: int = 90):
    """`count` JPEGs of size (W, H) in `folder`/class_XX/ (round robin over `classes`); returns their paths."""
    width, height = size
    rng = np.random.default_rng(seed)
    sources = photos()
    paths = []
    for c in range(classes):
        os.makedirs(os.path.join(folder, f"class_{c:02d}"), exist_ok=True)
    for k in range(count):
        src = sources[k % len(sources)]
        h, w = src.shape[:2]
        # a random crop of 50-100% of the side, the target's aspect ratio, resized to the target size
        aspect = width / height
        ch = int(min(h, w / aspect) * rng.uniform(0.5, 1.0))
        cw = min(w, int(ch * aspect))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = Image.fromarray(src[y:y + ch, x:x + cw]).resize((width, height), Image.BICUBIC)
        a = np.asarray(img).astype(np.int16)
        if rng.random() < 0.5:
            a = a[:, ::-1]
        a = a + rng.normal(0, 4, a.shape).astype(np.int16)  # texture, so upscaled sources do not compress too well
        path = os.path.join(folder, f"class_{k % classes:02d}", f"img_{k:06d}.jpg")
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path, quality=quality)
        paths.append(path)
    return paths


def parse_wxh(text: str):
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size {text!r}: expected WxH, e.g. 500x375") from None
    if w < 1 or h < 1:
        raise UsageError(f"--size {text!r}: both sides must be >= 1")
    return w, h


# ---------------------------------------------------------------- loaders


def ours(data: str, input_size, batch_size: int, workers: int, device, normalized: bool = True,
         on_device: bool = False):
    """(loader, prepare, set_epoch) of the pretraining path; `on_device`: with --augment-on-device (JPEGs decoded,
    cropped, resized and flipped on `device` in `prepare`)."""
    from fcmae.data.device_augment import DeviceAugment, DeviceJpegs, collate_pairs
    from fcmae.data.normalization import IMAGENET_MEAN, IMAGENET_STD, normalize
    from fcmae.data.sampling import EpochSampler, SeededDataset, make_loader
    from fcmae.data.shards import open_dataset
    from fcmae.data.transforms import pretrain_transform
    from fcmae.pretrain.data import MaskedImages
    from models.masking import mask_grid

    dataset = open_dataset(data, transform=pretrain_transform(input_size), input_size=input_size)
    augment = None
    if on_device:
        dataset = DeviceJpegs(dataset)
        augment = DeviceAugment(input_size, 3, dataset.dataset)
    grid = mask_grid(*input_size)
    dataset = SeededDataset(MaskedImages(dataset, grid[0] * grid[1], 0.6), seed=0, rngs=("torch",))
    sampler = EpochSampler(len(dataset), seed=0)
    loader = make_loader(dataset, sampler, batch_size, workers, pin_memory=device.type == "cuda",
                         collate_fn=collate_pairs if on_device else None)
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def prepare(batch):
        imgs, masks = batch
        imgs, masks = imgs.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        if augment is not None:
            imgs = augment(imgs)
        if imgs.dtype == torch.uint8 and normalized:
            imgs = normalize(imgs, mean, std)
        return imgs

    return loader, prepare, lambda epoch: sampler.set_epoch(epoch)


def baseline_transform(input_size):
    from torchvision import transforms

    from fcmae.data.normalization import IMAGENET_MEAN, IMAGENET_STD

    return transforms.Compose([
        transforms.RandomResizedCrop(tuple(input_size), scale=(0.2, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def baseline(folder: str, input_size, batch_size: int, workers: int, device):
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(folder, transform=baseline_transform(input_size))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        pin_memory=device.type == "cuda")
    return loader, lambda batch: batch[0].to(device, non_blocking=True), lambda epoch: None


def one_epoch(loader, prepare, set_epoch, epoch: int, max_batches=None) -> float:
    """images/s of one pass (up to max_batches batches)."""
    set_epoch(epoch)
    n, t0 = 0, time.perf_counter()
    for b, batch in enumerate(loader):
        x = prepare(batch)
        n += x.shape[0]
        if max_batches and b + 1 >= max_batches:
            break
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def compare(data, baseline_data, workers: int, batch_size: int, input_size, rounds: int, max_batches, device,
            on_device: bool = False):
    """Rates per round of "ours", "baseline", with --device cpu "ours_loader" (ours without the normalisation,
    which a GPU run does on the GPU: what the loader alone delivers) and with --augment-on-device "ours_device"
    (JPEGs decoded and augmented on --device, normalised there)."""
    runs = {"ours": ours(data, input_size, batch_size, workers, device),
            "baseline": baseline(baseline_data, input_size, batch_size, workers, device)}
    if device.type == "cpu":
        runs["ours_loader"] = ours(data, input_size, batch_size, workers, device, normalized=False)
    if on_device:
        runs["ours_device"] = ours(data, input_size, batch_size, workers, device, on_device=True)
    rates = {name: [] for name in runs}
    for name, run in runs.items():  # warm-up: worker start, page cache, lazy imports
        one_epoch(*run, epoch=0, max_batches=max_batches)
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for name in order:
            rates[name].append(one_epoch(*runs[name], epoch=r + 1, max_batches=max_batches))
    result = {"workers": workers}
    for name, values in rates.items():
        result[name] = {"rounds": values, "median": statistics.median(values), "min": min(values)}
        if name != "baseline":
            result[name]["ratio"] = result[name]["median"] / statistics.median(rates["baseline"])
            result[name]["paired_ratio"] = statistics.median(a / b for a, b in zip(values, rates["baseline"]))
    del runs  # workers end
    return result


def line(r) -> str:
    parts = []
    for name in ("ours", "ours_loader", "ours_device", "baseline"):
        if name in r:
            x = r[name]
            rounds = " ".join(f"{v:.1f}" for v in x["rounds"])
            ratio = f", x{x['ratio']:.2f} (paired x{x['paired_ratio']:.2f})" if "ratio" in x else ""
            parts.append(f"{name} {x['median']:.1f} (min {x['min']:.1f}; {rounds}){ratio}")
    return f"workers {r['workers']}: " + " | ".join(parts)


# ---------------------------------------------------------------- per-stage profile


def _ms(f, n):
    t0 = time.perf_counter()
    for i in range(n):
        f(i)
    return 1000 * (time.perf_counter() - t0) / n


def profile(folder: str, input_size, count: int, batch_size: int) -> dict:
    """ms per sample of each stage, one process, the first `count` files of the folder (ours and baseline)."""
    from torch.utils.data import default_collate

    from fcmae.data.decode import load_rgb, to_rgb
    from fcmae.data.folders import ImageFiles
    from fcmae.data.sampling import SeededDataset
    from fcmae.data.transforms import pretrain_transform
    from models.masking import random_mask

    files = ImageFiles(folder, input_size=input_size)
    paths = [files.filename(i) for i in range(min(count, len(files)))]
    n = len(paths)
    raw = [open(p, "rb").read() for p in paths]
    out = {"files": n}
    draft = files.draft_side

    def pil_loader(i):  # torchvision's ImageFolder loader
        img = Image.open(io.BytesIO(raw[i]))
        return img.convert("RGB")

    def ours_open(i):
        img = Image.open(io.BytesIO(raw[i]))
        if img.format == "JPEG":
            img.draft(None, (draft, draft))
        img.load()
        return img

    out["read file (page cache)"] = _ms(lambda i: open(paths[i], "rb").read(), n)
    out["baseline: decode (PIL open + convert RGB)"] = _ms(pil_loader, n)
    out["ours: decode (draft)"] = _ms(ours_open, n)
    decoded = [ours_open(i) for i in range(n)]
    out["ours: EXIF transpose"] = _ms(lambda i: ImageOps.exif_transpose(decoded[i].copy(), in_place=True), n) - \
        _ms(lambda i: decoded[i].copy(), n)
    out["ours: to_rgb"] = _ms(lambda i: to_rgb(decoded[i]), n)
    out["ours: load_rgb (decode + all rules)"] = _ms(lambda i: load_rgb(paths[i], draft), n)
    full = [pil_loader(i) for i in range(n)]
    ours_imgs = [load_rgb(p, draft) for p in paths]

    def steps(transform, imgs, label):
        xs = list(imgs)
        for t in getattr(transform, "transforms", [transform]):
            name = f"{label}: {type(t).__name__}"
            res = []
            out[name] = _ms(lambda i: res.append(t(xs[i])), n)
            xs = res
        return xs

    base_out = steps(baseline_transform(input_size), full, "baseline")
    ours_out = steps(pretrain_transform(input_size), ours_imgs, "ours")
    grid = (input_size[0] // 32) * (input_size[1] // 32)
    out["ours: mask"] = _ms(lambda i: random_mask(1, grid, 0.6)[0], n)
    seeded = SeededDataset(list(range(n)), seed=0, rngs=("torch",))
    out["ours: seeding (main process: with state restore)"] = _ms(lambda i: seeded[(1, i)], n)
    old_seed = _old_seeding()
    out["old seeding (torch.manual_seed, fork_rng, numpy/random state)"] = _ms(old_seed, n)
    b = min(batch_size, n)
    for label, xs in (("baseline", base_out), ("ours", ours_out)):
        batch = [(xs[i % n], 0) for i in range(b)]
        out[f"{label}: collate (per sample, {xs[0].dtype}, in-process)"] = _ms(lambda i: default_collate(batch), 5) / b
    return out


def _old_seeding():
    import random

    def f(i):
        s = 10_000_019 + i
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s % 2 ** 32)
            random.setstate(py_state)
            np.random.set_state(np_state)
    return f


# ---------------------------------------------------------------- CLI


def build_parser() -> ArgParser:
    p = ArgParser(prog="python -m tools.bench_loader", description=__doc__.split("\n\n")[0])
    add(p, "--data", kind=Str(optional=True), default=None, help="image folder (class subfolders) or tar shards, as --data-path")
    add(p, "--baseline-data", kind=Str(optional=True), default=None, help="image folder with class subfolders for the baseline "
                                                 "(default: --data, which must then be a folder)")
    add(p, "--workers", kind=Int(min=0), nargs="+", default=[0, 1, 2])
    add(p, "--batch-size", kind=Int(min=1), default=64)
    add(p, "--input-size", kind=Int(min=32), nargs="+", default=[224])
    add(p, "--rounds", kind=Int(min=1), default=3)
    add(p, "--batches", kind=Int(min=1), default=None, help="batches per round (default: one epoch)")
    add(p, "--device", kind=Device(), default="cuda" if torch.cuda.is_available() else "cpu")
    add(p, "--augment-on-device", action="store_true",
        help="also time the pretraining loader with --augment-on-device (\"ours_device\": JPEGs decoded and "
             "augmented on --device)")
    add(p, "--threads", kind=Int(min=1), default=1, help="torch threads of this process (default 1: on a small CPU, "
                                                  "several threads per batch op contend with the workers)")
    add(p, "--profile", kind=Int(min=1), default=None, metavar="N", help="per-stage ms per sample over N files instead")
    add(p, "--json", kind=Str(optional=True), default=None, help="also write the results to this JSON file")
    add(p, "--make-jpegs", kind=Str(optional=True), default=None, metavar="DIR", help="write test JPEGs to DIR instead of benchmarking")
    add(p, "--count", kind=Int(min=1), default=1000)
    add(p, "--size", kind=Str(), default="500x375", help="WxH of --make-jpegs images")
    add(p, "--classes", kind=Int(min=1), default=10)
    add(p, "--seed", kind=Int(min=0), default=0)
    return p


def run(argv=None):
    args = parse_with_config(build_parser(), argv)
    if args.make_jpegs:
        if args.count < 1 or args.classes < 1:
            raise UsageError("--count and --classes must be >= 1")
        check_writable_dir(args.make_jpegs)
        paths = make_jpegs(args.make_jpegs, args.count, parse_wxh(args.size), args.classes, args.seed)
        mb = sum(os.path.getsize(p) for p in paths) / 1e6
        print(f"wrote {len(paths)} JPEGs of {args.size} ({mb:.1f} MB) to {args.make_jpegs}")
        return {"written": len(paths)}
    if not args.data:
        raise UsageError("give --data FOLDER_OR_SHARDS (or --make-jpegs DIR)")
    try:
        args.input_size = parse_input_size(args.input_size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    from fcmae.data.shard_index import is_shards

    baseline_data = args.baseline_data or args.data
    if is_shards(baseline_data):
        raise UsageError("the baseline reads an image folder: give --baseline-data FOLDER with shards as --data")
    if min(args.workers) < 0 or args.batch_size < 1 or args.rounds < 1:
        raise UsageError("--workers must be >= 0, --batch-size and --rounds >= 1")
    if args.json:
        check_writable_dir(os.path.dirname(os.path.abspath(args.json)))
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return measure(args, baseline_data, device)
    finally:
        torch.set_num_threads(threads)


def save(result: dict, path):
    if path:
        write_text(path, json.dumps(result, indent=1))


def measure(args, baseline_data: str, device) -> dict:
    """The profile, or the comparison per worker count; the --json file is rewritten after each worker count
    (a run cut short keeps what it measured; "complete" says whether it ran to the end)."""
    if args.profile:
        result = {"profile": profile(baseline_data, args.input_size, args.profile, args.batch_size)}
        for stage, ms in result["profile"].items():
            print(f"{stage:70s} {ms:8.3f}" if stage != "files" else f"{ms} files, ms per sample:")
        save(result, args.json)
        return result
    result = {"data": args.data, "baseline_data": baseline_data, "batch_size": args.batch_size,
              "input_size": list(args.input_size), "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "cpus": os.cpu_count(), "complete": False, "runs": []}
    print(f"images/s, batch {args.batch_size}, {'x'.join(map(str, args.input_size))}, {args.rounds} rounds "
          f"(ours = pretraining loader, baseline = reference recipe)", flush=True)
    for w in args.workers:
        r = compare(args.data, baseline_data, w, args.batch_size, args.input_size, args.rounds, args.batches,
                    device, args.augment_on_device)
        result["runs"].append(r)
        print(line(r), flush=True)
        save(result, args.json)
    result["complete"] = True
    save(result, args.json)
    return result


def main(argv=None):
    sys.exit(run_cli(run, argv))


if __name__ == "__main__":
    main()
