"""Dense conv weights <-> MinkowskiEngine kernels, both directions, in one place (the minkowski backend converts
timm's weights on the fly; the checkpoint converter reads and writes the reference's MinkowskiEngine layout).

MinkowskiEngine 0.5.4 stores a 2-D kernel as (k*k, in, out), a channelwise (depthwise) kernel as (k*k, C), and
its offset index runs over the row offset fastest: K[h + k*w, i, o] = W[o, i, h, w] and K[h + k*w, c] = W[c, 0, h, w].
`W.permute(3, 2, 1, 0)` is indexed [w, h, i, o], so flattening its first two dims gives exactly w*k + h.
All four functions are pure reshapes/permutations (bit-exact, differentiable) and return contiguous tensors.
"""
import torch


def conv_kernel(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, k, k) dense weight -> ME kernel (k * k, Cin, Cout)."""
    return weight.permute(3, 2, 1, 0).reshape(-1, weight.shape[1], weight.shape[0]).contiguous()


def conv_weight(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """ME kernel (k * k, Cin, Cout) -> (Cout, Cin, k, k) dense weight; the inverse of conv_kernel."""
    return kernel.reshape(k, k, kernel.shape[1], kernel.shape[2]).permute(3, 2, 1, 0).contiguous()


def depthwise_kernel(weight: torch.Tensor) -> torch.Tensor:
    """(C, 1, k, k) dense depthwise weight -> ME channelwise kernel (k * k, C)."""
    return weight[:, 0].permute(2, 1, 0).reshape(-1, weight.shape[0]).contiguous()


def depthwise_weight(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """ME channelwise kernel (k * k, C) -> (C, 1, k, k) dense depthwise weight; the inverse of depthwise_kernel."""
    return kernel.reshape(k, k, kernel.shape[1]).permute(2, 1, 0).unsqueeze(1).contiguous()
