"""Feature-collapse monitor: dead MLP channels and GRN parameter norms, per stage of the encoder.

ConvNeXt V1 pretrained with FCMAE collapsed: many of its MLP hidden channels (the 4C activations after GELU)
went dead or saturated, which is why ConvNeXt V2 added GRN right there. This measures that directly on the
dense network (`encoder.stem`, then each of `encoder.stages`, unmasked), so it reads our FCMAE encoder and
timm's ConvNeXt V2 alike.

Per block, channel c's energy is E_c = mean over images and sites of GELU(fc1(x))_c^2. A channel is dead when
E_c < DEAD_RELATIVE_ENERGY x the median E over all channels of all blocks of its stage (one threshold per
stage, so a block whose channels all died is still seen against its live neighbours). A stage's dead
fraction is the mean over its blocks of the fraction of dead channels. GRN norms are ||gamma||_2 and
||beta||_2 of each block's GRN (timm's `grn.weight` / `grn.bias`), averaged over the stage's blocks.
"""
from typing import Dict, List

import torch
from torch import nn

DEAD_RELATIVE_ENERGY = 1e-3


def _channel_energy(block: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """(hidden channels,) mean square of an MLP activation; atto..nano use 1x1 convs (NCHW, channels on dim 1),
    tiny and up Linear layers on NHWC (channels last)."""
    channel_dim = 1 if isinstance(block.mlp.fc1, nn.Conv2d) else out.dim() - 1
    dims = [d for d in range(out.dim()) if d != channel_dim]
    return out.float().pow(2).mean(dim=dims)


@torch.no_grad()
def hooked_dense_pass(model: nn.Module, images: torch.Tensor, hooks, batch_size: int = 0):
    """Run `model`'s timm `stem` and `stages` densely (every site, no mask) in eval mode over `images`, `batch_size`
    at a time (0: all at once), with forward hooks [(module, fn)] installed for the pass; the hooks are removed and
    the mode restored afterwards. What the collapse monitor and tools/feature_diversity measure through."""
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    step = batch_size or len(images)
    try:
        for start in range(0, len(images), step):
            x = model.stem(images[start:start + step].to(device, torch.float32))
            for stage in model.stages:
                x = stage(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


@torch.no_grad()
def collapse_stats(encoder: nn.Module, images: torch.Tensor) -> Dict[str, List[float]]:
    """Per stage: `dead_fraction`, `gamma_norm`, `beta_norm` (lists of one float per stage).

    `encoder` owns timm's `stem` and `stages` (our FCMAE encoder, or a timm ConvNeXt V2); `images` are
    normalised (N, 3, H, W). Runs in eval mode and restores the encoder's mode. Give it enough images that
    every channel sees a few dozen sites in the last stage (H/32 x W/32 each): with a handful of sites a live
    channel whose pre-activations all happen to be near 0 counts as dead."""
    energies: Dict[int, List[torch.Tensor]] = {i: [] for i in range(len(encoder.stages))}
    hooks = []
    for i, stage in enumerate(encoder.stages):
        for block in stage.blocks:
            def record(module, args, out, i=i, block=block):
                energies[i].append(_channel_energy(block, out))
            hooks.append((block.mlp.act, record))
    hooked_dense_pass(encoder, images, hooks)

    stats = {"dead_fraction": [], "gamma_norm": [], "beta_norm": []}
    for i, stage in enumerate(encoder.stages):
        blocks = torch.stack(energies[i])  # (blocks, hidden channels)
        threshold = DEAD_RELATIVE_ENERGY * blocks.median()
        stats["dead_fraction"].append((blocks < threshold).double().mean(dim=1).mean().item())
        stats["gamma_norm"].append(sum(b.mlp.grn.weight.norm().item() for b in stage.blocks) / len(stage.blocks))
        stats["beta_norm"].append(sum(b.mlp.grn.bias.norm().item() for b in stage.blocks) / len(stage.blocks))
    return stats


def collapse_scalars(stats: Dict[str, List[float]]) -> Dict[str, float]:
    """TensorBoard tags -> values: collapse/stage{i}_dead_fraction, grn/stage{i}_gamma_norm, grn/stage{i}_beta_norm."""
    out = {}
    for i, value in enumerate(stats["dead_fraction"]):
        out[f"collapse/stage{i}_dead_fraction"] = value
    for name in ("gamma_norm", "beta_norm"):
        for i, value in enumerate(stats[name]):
            out[f"grn/stage{i}_{name}"] = value
    return out


def collapse_summary(stats: Dict[str, List[float]]) -> str:
    """One log line."""
    def fmt(values, spec):
        return " ".join(format(v, spec) for v in values)

    return (f"collapse: dead MLP channels per stage {fmt(stats['dead_fraction'], '.3f')}; "
            f"GRN |gamma| {fmt(stats['gamma_norm'], '.3g')}; |beta| {fmt(stats['beta_norm'], '.3g')}")
