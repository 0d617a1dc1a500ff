"""Feature-collapse analysis of the ConvNeXt V2 paper: per-layer average pairwise cosine distance between channels.

    python -m tools.feature_diversity CKPT [CKPT ...] [--labels V1-FCMAE V2-FCMAE ...] [--random-init]
        [--images 64] [--input-size 224] [--data-path DIR] [--activation mlp|block] [--out plot.png] [--json out.json]

The paper (Woo et al. 2023, 'Feature cosine distance analysis'): for an activation X (H x W x C) of one image,
each channel's map X_i is flattened to an HW vector; the layer's distance is
    (1 / C^2) * sum_i sum_j (1 - cos(X_i, X_j)) / 2
over all channel pairs (i = j included, distance 0), computed per image and averaged over the images. Higher means
more diverse channels; collapsed (redundant) channels drive it towards 0. With the i = j terms included the sum of
cosines is ||sum_i u_i||^2 >= 0 (u_i the unit maps), so the value lies in [0, 1/2]. A channel whose map is all
zero has no direction: it is given cosine 0 with every other channel (distance 1/2) and 1 with itself.

Layers: every block of every stage. `--activation mlp` (default) measures the MLP's hidden activation after GELU
and before GRN (4C channels), where the paper saw the collapse and where V2 put GRN, so V1 and V2 models are
measured at the same point; `--activation block` measures the block's output (C channels).

Models: each checkpoint in any layout the converter reads (models.convert), run densely (timm's ConvNeXt V2, no
masking) in eval mode; `--random-init` adds a randomly initialised model (seed 0) of the same variant. Images:
a seeded, class-stratified draw of Fashion-MNIST test images, or the first of a seeded shuffle of a folder's
images (--data-path), through fine-tuning's eval transform and default normalisation, with as many channels as
each model takes. Output: a table per stage (mean over its blocks) on stdout, one plot panel per stage
(block index on x, distance on y, one line per model) with --out, every value with --json. Bad input: one
`error:` line, exit code 2.
"""
import json
import os
import sys
from typing import Callable, Dict, List, Optional

import numpy as np
import timm
import torch
from torch import nn

from fcmae.pretrain.monitor import hooked_dense_pass
from fcmae.runtime.cli import check_writable_dir, run_cli
from fcmae.runtime.errors import DataError, UsageError
from fcmae.runtime.options import ArgParser, add
from fcmae.runtime.weights import timm_encoder

ACTIVATIONS = ("mlp", "block")


def channel_cosine_distance(x: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """(N,) the paper's average pairwise cosine distance between the channel maps of each of N samples.

    x: (N, C, H, W) with channel_dim 1, or (N, H, W, C) with channel_dim -1 / 3. Computed without the C x C
    matrix: with unit maps u_i, sum_ij cos(u_i, u_j) = ||sum_i u_i||^2, plus one for each all-zero map
    (whose cosine with itself is taken as 1)."""
    x = x.float().movedim(channel_dim, 1).flatten(2)  # (N, C, HW)
    norms = x.norm(dim=2, keepdim=True)
    dead = (norms[..., 0] == 0).sum(dim=1).float()
    unit = x / norms.clamp_min(torch.finfo(x.dtype).tiny)
    c = x.shape[1]
    mean_cos = (unit.sum(dim=1).pow(2).sum(dim=1) + dead) / (c * c)
    return (1.0 - mean_cos) / 2.0


def _hook_point(block: nn.Module, activation: str) -> nn.Module:
    return block.mlp.act if activation == "mlp" else block


def _channel_dim(block: nn.Module, activation: str) -> int:
    """timm's blocks take and return NCHW; inside, atto..nano's MLP is 1x1 convs (NCHW), tiny and up Linear (NHWC)."""
    if activation == "block" or isinstance(block.mlp.fc1, nn.Conv2d):
        return 1
    return -1


@torch.no_grad()
def feature_distances(model: nn.Module, images: torch.Tensor, activation: str = "mlp",
                      batch_size: int = 16) -> List[List[float]]:
    """Per stage, per block: the distance averaged over the images. `model` owns timm's `stem` and `stages`
    (timm's ConvNeXt V2 or our FCMAE encoder); it runs densely in eval mode and its mode is restored."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    sums: Dict[tuple, float] = {}
    hooks = []
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.blocks):
            def record(module, args, out, key=(i, j), dim=_channel_dim(block, activation)):
                sums[key] = sums.get(key, 0.0) + channel_cosine_distance(out, dim).sum().item()
            hooks.append((_hook_point(block, activation), record))
    hooked_dense_pass(model, images, hooks, batch_size)
    return [[sums[(i, j)] / len(images) for j in range(len(stage.blocks))] for i, stage in enumerate(model.stages)]


def load_images(num: int, input_size: int, in_chans: int = 3, data_path: Optional[str] = None,
                seed: int = 0) -> torch.Tensor:
    """(num, in_chans, S, S) normalised images (fine-tuning's eval transform and default normalisation): a
    class-stratified draw of Fashion-MNIST test images, or a seeded draw of a folder's images."""
    from fcmae.data.fashion_mnist import FashionMNIST
    from fcmae.data.folders import image_folder
    from fcmae.data.labelled import stratified_subset, targets_of
    from fcmae.data.transforms import eval_transform

    tf = eval_transform((input_size, input_size), in_chans)
    if data_path:
        if not os.path.isdir(data_path):
            raise DataError(f"--data-path {data_path} is not a folder")
        dataset = image_folder(data_path, transform=tf, in_chans=in_chans)
        order = np.random.default_rng(seed).permutation(len(dataset))[:num]
    else:
        dataset = FashionMNIST("val", transform=tf, in_chans=in_chans)
        order = stratified_subset(targets_of(dataset), min(num, len(dataset)), seed)
    if len(order) < num:
        raise DataError(f"--images {num}: {data_path} has only {len(order)} images")
    return torch.stack([dataset[int(i)][0] for i in order])


def random_model(name: str, in_chans: int = 3, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans).eval()


def analyse(models: Dict[str, nn.Module], images: Callable[[int], torch.Tensor],
            activation: str = "mlp") -> Dict[str, List[List[float]]]:
    """label -> per stage, per block distances; `images(in_chans)` gives the same images with the number of
    channels each model takes."""
    return {label: feature_distances(m, images(m.stem[0].in_channels), activation) for label, m in models.items()}


def image_source(num: int, input_size: int, data_path: Optional[str] = None, seed: int = 0):
    """in_chans -> the images (loaded once per number of channels)."""
    loaded: Dict[int, torch.Tensor] = {}

    def images(in_chans: int) -> torch.Tensor:
        if in_chans not in loaded:
            loaded[in_chans] = load_images(num, input_size, in_chans, data_path, seed)
        return loaded[in_chans]
    return images


def table(results: Dict[str, List[List[float]]]) -> str:
    """Markdown: one row per model, the mean over each stage's blocks and over all blocks."""
    stages = len(next(iter(results.values())))
    lines = ["| model | " + " | ".join(f"stage {i + 1}" for i in range(stages)) + " | all blocks |",
             "|---|" + "---|" * (stages + 1)]
    for label, per_stage in results.items():
        flat = [d for s in per_stage for d in s]
        lines.append(f"| {label} | " + " | ".join(f"{np.mean(s):.4f}" for s in per_stage)
                     + f" | {np.mean(flat):.4f} |")
    return "\n".join(lines)


def plot(results: Dict[str, List[List[float]]], path: str, title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = len(next(iter(results.values())))
    fig, axes = plt.subplots(1, stages, figsize=(3.6 * stages, 3.4), sharey=True)
    for i, ax in enumerate(np.atleast_1d(axes)):
        for label, per_stage in results.items():
            ax.plot(range(1, len(per_stage[i]) + 1), per_stage[i], marker="o", label=label)
        ax.set(title=f"stage {i + 1}", xlabel="block", xticks=range(1, len(per_stage[i]) + 1))
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("feature cosine distance")
    np.atleast_1d(axes)[-1].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def build_parser() -> ArgParser:
    p = ArgParser(prog="python -m tools.feature_diversity", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="*", metavar="CKPT", help="checkpoints in any layout the converter reads")
    add(p, "--labels", nargs="+", default=None,
        help="a name per model, checkpoints first then the random init (default: file names; 'random' for the "
             "random init when not named)")
    add(p, "--random-init", action="store_true", help="also a randomly initialised model (seed 0)")
    add(p, "--model", default=None, help="variant: checked against the checkpoints; needed with --random-init alone")
    add(p, "--activation", default="mlp", choices=list(ACTIVATIONS),
        help="mlp: hidden activation after GELU, before GRN (default); block: the block's output")
    add(p, "--images", type=int, default=64, help="images averaged over")
    add(p, "--input-size", type=int, default=224, help="square input side (>= 32)")
    add(p, "--data-path", default=None, help="a folder of images (default: Fashion-MNIST test images)")
    add(p, "--seed", type=int, default=0, help="picks the images")
    add(p, "--out", default=None, help="plot (PNG)")
    add(p, "--json", default=None, help="every value as JSON")
    return p


def run(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if not args.checkpoints and not args.random_init:
        raise UsageError("give at least one checkpoint, or --random-init (with --model)")
    if args.random_init and not args.checkpoints and not args.model:
        raise UsageError("--random-init alone needs --model")
    if args.images < 1:
        raise UsageError(f"--images must be >= 1, got {args.images}")
    if args.input_size < 32:
        raise UsageError(f"--input-size must be at least 32 (the network's total stride), got {args.input_size}")
    count = len(args.checkpoints) + args.random_init
    labels = args.labels or [os.path.basename(os.path.normpath(c)) for c in args.checkpoints]
    if args.random_init and len(labels) == len(args.checkpoints):
        labels = labels + ["random"]
    if len(labels) != count:
        raise UsageError(f"--labels names {len(labels)} models, but there are {count}")
    if len(set(labels)) != len(labels):
        raise UsageError("--labels must be distinct (give --labels when checkpoint file names repeat)")
    for c in args.checkpoints:
        if not os.path.exists(c):
            raise UsageError(f"checkpoint not found: {c}")
    for path in (args.out, args.json):
        if path:
            check_writable_dir(os.path.dirname(os.path.abspath(path)))

    models, name, in_chans = {}, args.model, 3
    for label, c in zip(labels, args.checkpoints):
        name, models[label] = timm_encoder(c, args.model)
        in_chans = models[label].stem[0].in_channels
    if args.random_init:
        models[labels[-1]] = random_model(name, in_chans)
    results = analyse(models, image_source(args.images, args.input_size, args.data_path, args.seed), args.activation)
    print(f"feature cosine distance ({args.activation} activation, {args.images} images at {args.input_size} px), "
          "mean over each stage's blocks:")
    print(table(results))
    out = {"activation": args.activation, "images": args.images, "input_size": args.input_size, "model": name,
           "models": dict(zip(labels, args.checkpoints + (["random init"] if args.random_init else []))),
           "distances": results}
    for path in (args.out, args.json):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if args.out:
        plot(results, args.out, f"feature cosine distance ({args.activation})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


def main(argv=None):
    sys.exit(run_cli(run, argv))


if __name__ == "__main__":
    main()
