"""Global Response Normalisation on visible sites only (reference notes, 'GRN').

    G = ||x||_2 over sites (per channel)   N = G / (mean_c(G) + 1e-6)   out = gamma * (x * N) + beta + x

`stats='sample'` pools G over each image's visible sites (what dense fine-tuning sees, and how the released
weights were trained); `stats='batch'` pools over every visible site of the whole (per-device) batch, as the
reference's sparse PyTorch code does.

The norms are taken in float32 (at least) whatever the autocast precision: in fp16 a channel's norm over a
56x56 map overflows (65504) at activations of about 5, a known NaN source of the reference's fine-tuning.
N is a ratio of norms, of order 1, so it is applied in the activations' own dtype.
"""
import torch
from timm.layers.grn import GlobalResponseNorm
from torch import nn

from .choices import GRN_STATS

GRN_EPS = 1e-6


def check_grn_stats(stats: str) -> str:
    if stats not in GRN_STATS:
        raise ValueError(f"grn_stats must be one of {GRN_STATS}, got '{stats}'")
    return stats


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def sums_of_squares(x: torch.Tensor, dim) -> torch.Tensor:
    """float32 (or wider) sums of x * x over `dim`, keepdim. bf16 squares and sums in its own dtype: the CPU and
    CUDA sum kernels accumulate bf16 in float32 and round only the result (relative error ~2^-9), which costs half
    of copying x - the widest activation of a block - to float32 first. fp16 squares overflow at 256: float32.
    Their sqrt has an infinite gradient at 0: autograd callers use l2_norms."""
    if x.dtype == torch.bfloat16:
        return (x * x).sum(dim, keepdim=True).float()
    x = x.to(stats_dtype(x))
    return (x * x).sum(dim, keepdim=True)


def l2_norms(x: torch.Tensor, dim) -> torch.Tensor:
    """float32 (or wider) L2 norms of x over `dim`, keepdim, differentiable with a zero (not NaN) gradient where a
    norm is 0 (a channel that GELU zeroed everywhere), as vector_norm's: bf16 by sums_of_squares, clamped at the
    smallest normal number before the sqrt; other dtypes by vector_norm in float32 or wider."""
    if x.dtype == torch.bfloat16:
        squares = sums_of_squares(x, dim)
        return squares.clamp_min(torch.finfo(squares.dtype).tiny).sqrt()
    return torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=stats_dtype(x))


def low_precision(x: torch.Tensor) -> bool:
    return x.dtype in (torch.bfloat16, torch.float16)


def grn_apply(x: torch.Tensor, gx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x: (..., C) channels-last; gx: the L2 norms (float32 or wider), broadcastable to x."""
    nx = (gx / (gx.mean(dim=-1, keepdim=True) + GRN_EPS)).to(x.dtype)
    return x + torch.addcmul(bias, weight, x * nx)


def gathered_norms(x: torch.Tensor, site_sample: torch.Tensor, batch: int, stats: str) -> torch.Tensor:
    """L2 norms for gathered sites x: (V, C). Returns (V, C) for 'sample' (each site gets its image's norm)
    or (1, C) for 'batch'."""
    if stats == "batch":
        return torch.linalg.vector_norm(x, dim=0, keepdim=True, dtype=stats_dtype(x))
    x = x.to(stats_dtype(x))
    sq = x.new_zeros(batch, x.shape[1]).index_add_(0, site_sample, x * x)
    # clamp: an image whose channel is all zero gets norm 0 with a zero (not NaN) gradient, like torch.norm
    return sq.clamp_min(torch.finfo(x.dtype).tiny).sqrt().index_select(0, site_sample)


def dense_norms(x: torch.Tensor, stats: str) -> torch.Tensor:
    """L2 norms for a masked-dense NHWC map (masked sites already zero): (N,1,1,C) or (1,1,1,C)."""
    dims = (1, 2) if stats == "sample" else (0, 1, 2)
    return torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=stats_dtype(x))


class Float32StatsGRN(GlobalResponseNorm):
    """timm's GRN (same parameters, same state-dict keys) with its norm taken in float32, as above, and its output
    in x's dtype under autocast (timm's promotes to float32, which the next linear layer casts straight back)."""

    def forward(self, x):
        x_g = l2_norms(x, self.spatial_dim)
        x_n = (x_g / (x_g.mean(dim=self.channel_dim, keepdim=True) + self.eps)).to(x.dtype)
        weight, bias = self.weight.view(self.wb_shape), self.bias.view(self.wb_shape)
        if low_precision(x):  # under autocast: the output stays in x's dtype (fc2 reads it so), no float32 copy
            weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        return x + torch.addcmul(bias, weight, x * x_n)


def use_float32_grn_stats(model: nn.Module) -> nn.Module:
    """Switch every timm GRN in `model` to Float32StatsGRN, in place (the class only: parameters stay)."""
    for m in model.modules():
        if type(m) is GlobalResponseNorm:
            m.__class__ = Float32StatsGRN
    return model
