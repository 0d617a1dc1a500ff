"""Layer-wise lr decay and weight-decay exclusion for timm's ConvNeXt V2, as in the reference fine-tuning code.

timm's own layer decay (`create_optimizer_v2(layer_decay=...)`) groups layers through the model's
`group_matcher`, which gives other ids than the reference; the recipes' layer-decay values were tuned for the
reference ids, so they are reproduced here on timm's parameter names:

    reference                 timm
    downsample_layers.0.*     stem.*
    downsample_layers.i.*     stages.i.downsample.*   (i = 1..3; stages.0.downsample has no parameters)
    stages.i.j.*              stages.i.blocks.j.*
    norm.*, head.*            head.norm.*, head.fc.*
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Dict, List, Sequence

if TYPE_CHECKING:  # torch only for the annotations: finetune.options (and so --help) reads LAYER_DECAY_TYPES
    from torch import nn

LAYER_DECAY_TYPES = ("single", "group")
GROUP_LAYERS = 12  # the reference's "group" mode: 12 groups of about three blocks (built for a 27-deep stage 3)

_STEM = re.compile(r"stem\.")
_DOWNSAMPLE = re.compile(r"stages\.(\d+)\.downsample\.")
_BLOCK = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.")


def _position(name: str):
    """(stage, block) of a parameter: block None for a downsample layer (the stem is stage 0's), (None, None)
    for everything after the last stage (head.norm, head.fc)."""
    if _STEM.match(name):
        return 0, None
    m = _DOWNSAMPLE.match(name)
    if m:
        return int(m.group(1)), None
    m = _BLOCK.match(name)
    if m:
        return int(m.group(1)), int(m.group(2))
    return None, None


def layer_id_single(name: str, depths: Sequence[int]) -> int:
    """One id per block, counted from 1; a downsample layer (the stem included) shares the id of the first
    block of the stage it opens; the head gets sum(depths) + 1 (reference `get_num_layer_for_convnext_single`)."""
    stage, block = _position(name)
    if stage is None:
        return sum(depths) + 1
    return sum(depths[:stage]) + (block or 0) + 1


def layer_id_group(name: str, depths: Sequence[int]) -> int:
    """12 groups (reference `get_num_layer_for_convnext`): stem 0; stage 0 -> 1; stage-1 downsample and
    blocks -> 2; stage-2 downsample -> 3, stage-2 block b -> 3 + b // 3; stage 3 and its downsample -> 12;
    head 13. `depths` is unused, as in the reference: the ids assume a 27-deep stage 2 (base and up)."""
    stage, block = _position(name)
    if stage is None:
        return GROUP_LAYERS + 1
    if stage == 3:
        return GROUP_LAYERS
    if block is None:  # downsample: the stem is 0, stages 1 and 2 open their group
        return 0 if stage == 0 else stage + 1
    return stage + 1 if stage < 2 else 3 + block // 3


def num_layers(layer_decay_type: str, depths: Sequence[int]) -> int:
    return GROUP_LAYERS if layer_decay_type == "group" else sum(depths)


def layer_id(name: str, layer_decay_type: str, depths: Sequence[int]) -> int:
    if layer_decay_type not in LAYER_DECAY_TYPES:
        raise ValueError(f"layer decay type must be one of {LAYER_DECAY_TYPES}, got {layer_decay_type!r}")
    return (layer_id_single if layer_decay_type == "single" else layer_id_group)(name, depths)


def lr_scale(layer: int, layer_decay: float, total_layers: int) -> float:
    """decay^(num_layers + 1 - id): 1 for the head, smaller towards the stem."""
    return layer_decay ** (total_layers + 1 - layer)


def no_weight_decay(name: str, param) -> bool:
    """1-D tensors (norms, GRN gamma/beta in timm's (C,) shape) and biases are not decayed."""
    return param.ndim <= 1 or name.endswith(".bias") or ".grn." in name


def param_groups(model: nn.Module, depths: Sequence[int], weight_decay: float, layer_decay: float = 1.0,
                 layer_decay_type: str = "single") -> List[Dict]:
    """Optimiser parameter groups, one per (layer id, decayed or not), each with `weight_decay` and the
    `lr_scale` that timm's schedulers multiply the scheduled lr by. Frozen parameters are left out."""
    total = num_layers(layer_decay_type, depths)
    groups: Dict[str, Dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = layer_id(name, layer_decay_type, depths)
        decay = not no_weight_decay(name, p)
        key = f"layer_{layer}_{'decay' if decay else 'no_decay'}"
        if key not in groups:
            groups[key] = {"name": key, "params": [], "param_names": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": lr_scale(layer, layer_decay, total)}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, depths: Sequence[int], *, lr: float, weight_decay: float, layer_decay: float,
                    layer_decay_type: str, device_type: str):
    """AdamW (0.9, 0.999) through timm's factory on the reference's layer-decay groups; fused where PyTorch has it
    (CPU, CUDA), so a non-finite step is skipped on the device (fcmae.runtime.optim.step_unless)."""
    from functools import partial

    from timm.optim import create_optimizer_v2

    groups = partial(param_groups, depths=depths, weight_decay=weight_decay, layer_decay=layer_decay,
                     layer_decay_type=layer_decay_type)
    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999),
                               param_group_fn=groups, fused=device_type in ("cpu", "cuda"))
