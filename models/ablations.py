"""Architecture ablations of the ConvNeXt V2 paper, applied to a model in place.

`remove_grn`: the GRN ablation (ConvNeXt V1-style blocks). GRN computes out = x + gamma * (x * N(x)) + beta, so
with gamma = beta = 0 it is exactly the identity; zeroing and freezing them turns every block into a block
without GRN while the state-dict keys (and shapes) stay timm's, so checkpoints still load anywhere a V2 one does.
Frozen means requires_grad False: optimisers built from trainable parameters (timm's param_groups_weight_decay,
the fine-tuning layer-decay groups) never see them, and torch's AdamW skips them anyway (no gradient), so neither
a step nor weight decay can move them off zero.
"""
import torch
from timm.layers.grn import GlobalResponseNorm
from torch import nn


def grn_modules(model: nn.Module):
    """Every GRN of `model` (timm's class and its subclasses, e.g. models.grn.Float32StatsGRN)."""
    return [m for m in model.modules() if isinstance(m, GlobalResponseNorm)]


@torch.no_grad()
def remove_grn(model: nn.Module) -> nn.Module:
    """Make every GRN in `model` the identity: gamma (timm's `weight`) and beta (`bias`) zeroed and frozen.
    Pass the encoder (FCMAE.encoder) to ablate only it; the decoder block keeps its GRN. Returns `model`."""
    found = grn_modules(model)
    if not found:
        raise ValueError("remove_grn: the model has no GRN layer (not a ConvNeXt V2?)")
    for grn in found:
        for p in (grn.weight, grn.bias):
            p.zero_()
            p.requires_grad_(False)
    return model


def has_active_grn(model: nn.Module) -> bool:
    """Whether any GRN of `model` can act: a non-zero gamma or beta, or one that can still be trained."""
    return any(p.requires_grad or bool(p.any()) for m in grn_modules(model) for p in (m.weight, m.bias))
