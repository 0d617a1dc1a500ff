"""Functional views of timm's ConvNeXt V2 modules, so every backend reads the same parameters.

atto..nano use 1x1 convs (weights (out, in, 1, 1)) where tiny..huge use Linear ((out, in)); `flatten(1)`
gives the (out, in) matrix for both.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..grn import low_precision


def linear(x, layer):
    return F.linear(x, layer.weight.flatten(1), layer.bias)


def layer_norm(x, norm):
    """Per-site LayerNorm over the last (channel) dim, for timm's LayerNorm and LayerNorm2d alike. On CPU a
    bf16/fp16 x is normalised in float32 (output float32; the next linear layer casts it under autocast): the
    reduced-precision kernels are slower there at few channels (38912 x 40, forward + backward: 8.9 ms against
    4.8 ms with the casts)."""
    if x.device.type == "cpu" and low_precision(x):
        x = x.float()
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def stem_as_linear(stem_conv):
    """The 4x4 stride-4 stem conv is a per-site linear map of the (c, kh, kw)-flattened pixel patch."""
    return stem_conv.weight.flatten(1), stem_conv.bias


def downsample_as_linear(conv):
    """The 2x2 stride-2 conv as a linear map of the four window sites concatenated in (kh, kw) order:
    weight (Cout, Cin, 2, 2) -> (Cout, 4 * Cin) with input index (kh * 2 + kw) * Cin + cin."""
    w = conv.weight
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), conv.bias


def run_block(encoder, branch, *args):
    """A block's residual branch, recomputed in backward when the encoder's grad_checkpointing is on."""
    if encoder.grad_checkpointing and torch.is_grad_enabled():
        return checkpoint(branch, *args, use_reentrant=False)
    return branch(*args)
