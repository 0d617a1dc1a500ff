"""Reconstructions of an FCMAE pretraining checkpoint, as a PNG grid: one row per image, columns
original | masked input | reconstruction (visible patches pasted back; with norm_pix_loss the prediction is
mapped back with each patch's own mean and std). The same picture pretraining writes to TensorBoard
(`fcmae.visualize.reconstruction_grid`).

    python -m tools.visualize CKPT --out grid.png [--data-path DIR | --dataset fashion-mnist] [--num 8]
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
import sys
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from fcmae.cli import check_writable_dir, run_cli
from fcmae.config import ArgParser, UsageError, add, input_size as parse_input_size
from fcmae.data import FashionMNIST, image_folder
from fcmae.visualize import reconstruction_grid
from finetune.data import eval_transform
from models import create_fcmae
from models.convert import CheckpointError, from_canonical, read_checkpoint, to_canonical
from models.masking import mask_grid, num_visible, random_mask



def checkpoint_settings(obj) -> dict:
    """The pretraining settings a checkpoint records: ours store `args` as a dict, the reference code as an
    argparse.Namespace (with `input_size` a single int)."""
    args = obj.get("args") if isinstance(obj, dict) else None
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    return dict(args) if isinstance(args, dict) else {}


def load_fcmae(path, device="cpu") -> Tuple[torch.nn.Module, dict]:
    """(FCMAE in eval mode with every tensor loaded strictly, settings) from a pretraining checkpoint.
    settings: model, input_size (or None), mask_ratio, norm_pix_loss, grn_stats, decoder_dim, decoder_depth."""
    obj = read_checkpoint(path)
    name, layout, state = to_canonical(obj)
    if "mask_token" not in state:
        raise CheckpointError(f"{path} ({layout}) holds no FCMAE decoder: it is an encoder-only or fine-tuning "
                              "checkpoint, which cannot reconstruct images; pass a pretraining checkpoint")
    saved = checkpoint_settings(obj)
    size = saved.get("input_size")
    settings = {
        "model": name,
        "input_size": parse_input_size(size) if size is not None else None,
        "mask_ratio": float(saved.get("mask_ratio", 0.6)),
        "norm_pix_loss": bool(saved.get("norm_pix_loss", True)),  # the reference's default too
        "grn_stats": saved.get("grn_stats", "sample"),
        "decoder_dim": state["mask_token"].shape[1],
        "decoder_depth": len({k.split(".")[1] for k in state if k.startswith("decoder.")}),
    }
    model = create_fcmae(name, grn_stats=settings["grn_stats"], mask_ratio=settings["mask_ratio"],
                         decoder_dim=settings["decoder_dim"], decoder_depth=settings["decoder_depth"],
                         norm_pix_loss=settings["norm_pix_loss"])
    model.load_state_dict(from_canonical(name, state, "ours"))  # strict: encoder and decoder, every tensor
    return model.to(device).eval(), settings


def pick_images(data_path: Optional[str], size: Tuple[int, int], num: int, seed: int) -> torch.Tensor:
    """`num` images drawn without replacement by `seed`, in dataset order, through the eval transform."""
    transform = eval_transform(size)
    dataset = image_folder(data_path, transform=transform) if data_path else FashionMNIST("test", transform=transform)
    chosen = np.sort(np.random.default_rng(seed).choice(len(dataset), size=min(num, len(dataset)), replace=False))
    return torch.stack([dataset[int(i)][0] for i in chosen])


def render(checkpoint, out: str, data_path: Optional[str] = None, num: int = 8,
           input_size: Optional[Sequence[int]] = None, mask_ratio: Optional[float] = None, seed: int = 0,
           device: str = "cpu") -> dict:
    """Write the grid PNG to `out`; returns what was drawn (settings, size, ratio, masked-patch loss)."""
    from torchvision.utils import save_image

    model, settings = load_fcmae(checkpoint, device)
    size = parse_input_size(input_size) if input_size else settings["input_size"] or (224, 224)
    ratio = settings["mask_ratio"] if mask_ratio is None else mask_ratio
    try:
        grid = mask_grid(*size)
        num_visible(grid[0] * grid[1], ratio)
    except ValueError as e:
        raise UsageError(str(e)) from None
    imgs = pick_images(data_path, size, num, seed).to(device)
    mask = random_mask(len(imgs), grid[0] * grid[1], ratio, generator=torch.Generator().manual_seed(seed))
    picture = reconstruction_grid(model, imgs, mask.to(device))
    with torch.no_grad():
        loss = model(imgs, mask.to(device))[0].item()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_image(picture, out)
    return settings | {"input_size": list(size), "mask_ratio": ratio, "images": len(imgs), "loss": loss, "out": out}


def build_parser() -> ArgParser:
    p = ArgParser(prog="python -m tools.visualize", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="FCMAE pretraining checkpoint (ours or the reference MinkowskiEngine layout)")
    add(p, "--out", required=True, help="PNG file to write")
    add(p, "--dataset", default="fashion-mnist", choices=["fashion-mnist"],
        help="built-in dataset (its test split), used when --data-path is not given")
    add(p, "--data-path", default=None, help="folder of images, flat or in class subfolders")
    add(p, "--num", type=int, default=8, help="images (rows)")
    add(p, "--input-size", type=int, nargs="+", default=None,
        help="224 (square) or 'H W', multiples of 32; default: the checkpoint's, else 224")
    add(p, "--mask-ratio", type=float, default=None, help="default: the checkpoint's, else 0.6")
    add(p, "--seed", type=int, default=0, help="picks the images and the masks")
    add(p, "--device", default="cpu")
    return p


def run(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if not os.path.exists(args.checkpoint):
        raise CheckpointError(f"checkpoint not found: {args.checkpoint}")
    if args.num < 1:
        raise UsageError(f"--num must be >= 1, got {args.num}")
    if args.input_size is not None:
        try:
            args.input_size = parse_input_size(args.input_size)
            mask_grid(*args.input_size)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} requested but CUDA is not available; use --device cpu")
    check_writable_dir(os.path.dirname(os.path.abspath(args.out)))
    done = render(args.checkpoint, args.out, args.data_path, args.num, args.input_size, args.mask_ratio, args.seed,
                  args.device)
    print(f"{args.out}: {done['images']} images of {done['model']} at {'x'.join(map(str, done['input_size']))}, "
          f"mask ratio {done['mask_ratio']}, norm-pix {done['norm_pix_loss']}, masked-patch loss {done['loss']:.4f}")
    return done


def main(argv=None):
    sys.exit(run_cli(run, argv))


if __name__ == "__main__":
    main()
