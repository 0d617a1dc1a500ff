"""Reconstructions of an FCMAE pretraining checkpoint, as a PNG grid: one row per image, columns
original | masked input | reconstruction (visible patches pasted back; with norm_pix_loss the prediction is
mapped back with each patch's own mean and std). The same picture pretraining writes to TensorBoard
(`fcmae.pretrain.visualize.reconstruction_grid`).

    python -m fcmae.tools.visualize CKPT --out grid.png [--data-path DIR | --dataset fashion-mnist] [--num 8]
        [--input-size 224 | H W] [--mask-ratio 0.6] [--seed 0]

CKPT: our pretraining checkpoint (`format: fcmae-pretrain`, whose `args` give the input size, mask ratio,
norm-pix loss and GRN statistics used as defaults here), or the reference code's MinkowskiEngine pretraining
layout (defaults from its `args` where present). Images: `--data-path` (a folder, flat or in class
subfolders), else Fashion-MNIST's test split (images pretraining did not see), with the eval transform of
fine-tuning; which images and which patches are masked are fixed by --seed. Bad input: one `error:` line,
exit code 2.
"""
import argparse
import os
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from fcmae.data.fashion_mnist import FashionMNIST
from fcmae.data.normalization import resolve_mean_std
from fcmae.data.shards import open_dataset
from fcmae.data.transforms import eval_transform
from fcmae.pretrain.visualize import reconstruction_grid
from fcmae.runtime.checkpoint_file import read_checkpoint
from fcmae.runtime.cli import check_output_file, exit_with
from fcmae.runtime.errors import CheckpointError, UsageError
from fcmae.runtime.weights import checkpoint_errors
from fcmae.runtime.options import ArgParser, Device, Float, Int, Str, add, parse_with_config
from fcmae.runtime.options import input_size as parse_input_size
from models import create_fcmae
from models.convert import from_canonical, in_chans_of, to_canonical
from models.masking import mask_grid, num_visible, random_mask


def checkpoint_settings(obj) -> dict:
    """The pretraining settings a checkpoint records: ours store `args` as a dict, the reference code as an
    argparse.Namespace (with `input_size` a single int)."""
    args = obj.get("args") if isinstance(obj, dict) else None
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    return dict(args) if isinstance(args, dict) else {}


def load_fcmae(path, device="cpu", mask_ratio: Optional[float] = None) -> Tuple[torch.nn.Module, dict]:
    """(FCMAE in eval mode with every tensor loaded strictly, settings) from a pretraining checkpoint.
    settings: model, in_chans, input_size (or None), mask_ratio (the checkpoint's unless given), norm_pix_loss,
    grn_stats, decoder_dim, decoder_depth, mean, std (None: the defaults for in_chans)."""
    obj = read_checkpoint(path)
    with checkpoint_errors():
        name, layout, state = to_canonical(obj)
    if "mask_token" not in state:
        raise CheckpointError(f"{path} ({layout}) holds no FCMAE decoder: it is an encoder-only or fine-tuning "
                              "checkpoint, which cannot reconstruct images; pass a pretraining checkpoint")
    saved = checkpoint_settings(obj)
    size = saved.get("input_size")
    settings = {
        "model": name,
        "in_chans": in_chans_of(state),
        "input_size": parse_input_size(size) if size is not None else None,
        "mask_ratio": float(saved.get("mask_ratio", 0.6)) if mask_ratio is None else mask_ratio,
        "norm_pix_loss": bool(saved.get("norm_pix_loss", True)),  # the reference's default too
        "grn_stats": saved.get("grn_stats", "sample"),
        "decoder_dim": state["mask_token"].shape[1],
        "decoder_depth": len({k.split(".")[1] for k in state if k.startswith("decoder.")}),
        "mean": saved.get("mean"), "std": saved.get("std"),
    }
    model = create_fcmae(name, grn_stats=settings["grn_stats"], mask_ratio=settings["mask_ratio"],
                         decoder_dim=settings["decoder_dim"], decoder_depth=settings["decoder_depth"],
                         norm_pix_loss=settings["norm_pix_loss"], in_chans=settings["in_chans"])
    model.load_state_dict(from_canonical(name, state, "ours"))  # strict: encoder and decoder, every tensor
    return model.to(device).eval(), settings


def pick_images(data_path: Optional[str], size: Tuple[int, int], num: int, seed: int, in_chans: int = 3,
                mean=None, std=None) -> torch.Tensor:
    """`num` images drawn without replacement by `seed`, in dataset order, through fine-tuning's eval transform
    (normalised with mean/std)."""
    transform = eval_transform(size, in_chans, mean, std)
    dataset = open_dataset(data_path, transform=transform, input_size=size, in_chans=in_chans) if data_path \
        else FashionMNIST("test", transform=transform, in_chans=in_chans)
    chosen = np.sort(np.random.default_rng(seed).choice(len(dataset), size=min(num, len(dataset)), replace=False))
    return torch.stack([dataset[int(i)][0] for i in chosen])


def render(checkpoint, out: str, data_path: Optional[str] = None, num: int = 8,
           input_size: Optional[Sequence[int]] = None, mask_ratio: Optional[float] = None, seed: int = 0,
           device: str = "cpu", show_channels=None, mean=None, std=None) -> dict:
    """Write the grid PNG to `out`; returns what was drawn (settings, size, ratio, masked-patch loss)."""
    from torchvision.utils import save_image

    model, settings = load_fcmae(checkpoint, device, mask_ratio)
    size = parse_input_size(input_size) if input_size else settings["input_size"] or (224, 224)
    ratio = settings["mask_ratio"]
    try:
        grid = mask_grid(*size)
        num_visible(grid[0] * grid[1], ratio)
    except ValueError as e:
        raise UsageError(str(e)) from None
    c = settings["in_chans"]
    if show_channels is not None and (len(show_channels) != 3 or max(show_channels) >= c):
        raise UsageError(f"--show-channels takes three channel indices below the checkpoint's {c} channels, "
                         f"got {list(show_channels)}")
    mean, std = resolve_mean_std(c, mean if mean is not None else settings["mean"],
                                 std if std is not None else settings["std"])
    imgs = pick_images(data_path, size, num, seed, c, mean, std).to(device)
    mask = random_mask(len(imgs), grid[0] * grid[1], ratio, generator=torch.Generator().manual_seed(seed))
    picture = reconstruction_grid(model, imgs, mask.to(device), mean=mean, std=std, show_channels=show_channels)
    with torch.no_grad():
        loss = model(imgs, mask.to(device))[0].item()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_image(picture, out)
    return settings | {"input_size": list(size), "mask_ratio": ratio, "images": len(imgs), "loss": loss, "out": out}


def build_parser() -> ArgParser:
    p = ArgParser(prog="python -m fcmae.tools.visualize", description=__doc__.split("\n\n")[0])
    add(p, "-c", "--config", default=None, help="YAML file of option defaults")
    p.add_argument("checkpoint", help="FCMAE pretraining checkpoint (ours or the reference MinkowskiEngine layout)")
    add(p, "--out", kind=Str(), required=True, help="PNG file to write")
    add(p, "--dataset", kind=Str(["fashion-mnist"]), default="fashion-mnist",
        help="built-in dataset (its test split), used when --data-path is not given")
    add(p, "--data-path", "--data-dir", kind=Str(optional=True), default=None, metavar="PATH",
        help="folder of images (flat or in class subfolders) or tar shards")
    add(p, "--num", kind=Int(min=1), default=8, help="images (rows)")
    add(p, "--input-size", kind=Int(min=32), nargs="+", default=None,
        help="224 (square) or 'H W', multiples of 32; default: the checkpoint's, else 224")
    add(p, "--mask-ratio", kind=Float(min=0, max=1, open_min=True, open_max=True), default=None,
        help="default: the checkpoint's, else 0.6")
    add(p, "--seed", kind=Int(min=0), default=0, help="picks the images and the masks")
    add(p, "--device", kind=Device(), default="cpu")
    add(p, "--show-channels", kind=Int(min=0), nargs="+", default=None,
        help="three channel indices drawn as RGB (multispectral data); default: RGB for 3 channels, else one grey "
             "panel per channel")
    add(p, "--mean", kind=Float(), nargs="+", default=None, help="per-channel mean (default: the checkpoint's)")
    add(p, "--std", kind=Float(min=0, open_min=True), nargs="+", default=None,
        help="per-channel std (default: the checkpoint's)")
    return p


def run(argv=None) -> dict:
    args = parse_with_config(build_parser(), argv)
    if not os.path.exists(args.checkpoint):
        raise CheckpointError(f"checkpoint not found: {args.checkpoint}")
    if args.input_size is not None:
        try:
            args.input_size = parse_input_size(args.input_size)
            mask_grid(*args.input_size)
        except ValueError as e:
            raise UsageError(str(e)) from None
    check_output_file(args.out, "--out")
    done = render(args.checkpoint, args.out, args.data_path, args.num, args.input_size, args.mask_ratio, args.seed,
                  args.device, args.show_channels, args.mean, args.std)
    print(f"{args.out}: {done['images']} images of {done['model']} at {'x'.join(map(str, done['input_size']))}, "
          f"mask ratio {done['mask_ratio']}, norm-pix {done['norm_pix_loss']}, masked-patch loss {done['loss']:.4f}")
    return done


def main(argv=None):
    exit_with(run, argv)


if __name__ == "__main__":
    main()
