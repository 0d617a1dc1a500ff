"""Submanifold depthwise 7x7 convolution on gathered sites, with a faster CPU backward.

PyTorch's CPU backward for the weight of a depthwise conv runs several times slower than the forward. Both
gradients are convolutions themselves: grad_input is the depthwise conv of grad_output with the flipped kernel,
and grad_weight[c] = sum_n corr(x[n, c], grad_output[n, c]) is one depthwise conv over the N*C maps with the
gradient as a (H, W) kernel and a 7x7 output. On other devices the native kernels are used unchanged.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..grn import low_precision


def _zero_map(maps, key, size, like: torch.Tensor) -> torch.Tensor:
    """A zero buffer; with a cache `maps` (a dict, eager mode) one shared by all blocks of a stage: writers only
    touch visible sites, so masked sites stay zero and the map is allocated and zeroed once per stage instead of
    once per use. Without one (maps=None, under torch.compile) a fresh buffer."""
    if maps is None:
        return like.new_zeros(size)
    key = (key, like.dtype, like.device)
    if key not in maps:
        maps[key] = like.new_zeros(size)
    return maps[key]


def scatter_sites(maps, key, flat, shape, x: torch.Tensor) -> torch.Tensor:
    """(V, C) rows -> (N, C, H, W) channels-last view, zeros at masked sites (not autograd-safe: for use inside
    autograd Functions). shape = (N, H, W); flat: (V,) index of every row in the (N * H * W) map."""
    n, h, w = shape
    dense = _zero_map(maps, key, (n * h * w, x.shape[1]), x).index_copy_(0, flat, x)
    return dense.view(n, h, w, -1).permute(0, 3, 1, 2)


def scatter_planar(maps, key, flat, shape, x: torch.Tensor) -> torch.Tensor:
    """(V, C) -> (C, N * H * W) planes (channel-major), zeros at masked sites."""
    n, h, w = shape
    return _zero_map(maps, key, (x.shape[1], n * h * w), x).index_copy_(1, flat, x.t())


def gather_sites(dense: torch.Tensor, flat) -> torch.Tensor:
    """(N, C, H, W) -> (V, C) at the sites `flat`."""
    return dense.permute(0, 2, 3, 1).reshape(-1, dense.shape[1]).index_select(0, flat)


class _SiteDepthwiseConv(torch.autograd.Function):
    """Submanifold depthwise conv on gathered sites: (V, C) rows -> (V, C) rows.

    The rows are scattered into zero maps (`maps`: eager-mode cache reused by every block of a stage, see
    _zero_map), convolved, and gathered back at `flat`. Only tensors, ints and the cache dict (None under
    torch.compile) are passed, so dynamo traces forward and backward. Only the (V, C) rows are saved for backward,
    not the 2.6x larger map (at mask ratio 0.6).
    CPU backward (measured per stage at atto/224/batch 32, forward + backward: 58/21/10/5 ms against PyTorch's
    77/35/18/13 ms): grad_input as a conv of the channels-last gradient map with the flipped kernel, grad_weight
    as one conv over C*N planes (module docstring), both maps scattered straight into planar (C, N*H*W) buffers,
    which costs less than scattering channels-last and transposing. Elsewhere PyTorch's own backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, flat, shape, padding, maps):
        ctx.save_for_backward(x, weight, flat)
        ctx.shape, ctx.padding, ctx.maps = shape, padding, maps
        dense = scatter_sites(maps, "x", flat, shape, x)
        return gather_sites(F.conv2d(dense, weight, bias, padding=padding, groups=weight.shape[0]), flat)

    @staticmethod
    def backward(ctx, grad):
        x, weight, flat = ctx.saved_tensors
        shape, pad, maps = ctx.shape, ctx.padding, ctx.maps
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # under autocast the gradient arrives in bf16/fp16: compute in its dtype, return in the inputs' dtypes
        xg, w = x.to(grad.dtype), weight.to(grad.dtype)
        c = w.shape[0]
        gmap = scatter_sites(maps, "grad", flat, shape, grad)
        if grad.device.type != "cpu":
            gx, gw, gb = torch.ops.aten.convolution_backward(
                gmap, scatter_sites(maps, "x", flat, shape, xg), w, [c], (1, 1), pad, (1, 1), False, (0, 0), c,
                [need_x, need_w, need_b])
            gx = gather_sites(gx, flat) if need_x else None
        else:
            gx = gather_sites(F.conv2d(gmap, w.flip(2, 3), padding=pad, groups=c), flat) if need_x else None
            gw = None
            if need_w:
                xp = scatter_planar(maps, "x_planar", flat, shape, xg)
                gp = scatter_planar(maps, "grad_planar", flat, shape, grad)
                gw = planar_weight_grad(xp, gp, shape, pad)
            gb = grad.sum(0) if need_b else None  # the gradient is zero at masked sites: the rows hold all of it
        return (None if gx is None else gx.to(x.dtype), None if gw is None else gw.to(weight.dtype),
                None if gb is None else gb.to(weight.dtype), None, None, None, None)


def planar_weight_grad(xp: torch.Tensor, gp: torch.Tensor, shape, pad) -> torch.Tensor:
    """The depthwise kernel's gradient (C, 1, kh, kw) from input and output-gradient planes (C, N * H * W):
    grad_weight[c] = sum_n corr(x[n, c], grad[n, c]), one depthwise conv over the C * N planes."""
    (n, h, w), c = shape, xp.shape[0]
    gw = F.conv2d(xp.view(1, c * n, h, w), gp.view(c * n, 1, h, w), padding=pad, groups=c * n)
    return gw.view(c, n, *gw.shape[2:]).sum(1).unsqueeze(1)


def float32_on_cpu(x: torch.Tensor) -> bool:
    """bf16/fp16 depthwise convolutions run in float32 on CPU: there oneDNN's bf16 depthwise kernels are no faster
    than float32 and PyTorch's bf16 backward is 2x slower (atto/224/batch 32: the decoder's 7x7 conv backward 35 ms
    in bf16, 16 ms in float32), and the LayerNorm that follows is faster in float32 at few channels."""
    return x.device.type == "cpu" and (low_precision(x) or torch.is_autocast_enabled("cpu"))


def _apply(function, x, *args):
    """function.apply(x, *args), in float32 with autocast off where float32_on_cpu(x)."""
    if float32_on_cpu(x):
        with torch.autocast("cpu", enabled=False):
            return function.apply(x.float(), *args)
    return function.apply(x, *args)


def site_depthwise_conv(x, conv, sites):
    """`conv` (timm's depthwise nn.Conv2d, stride 1, 'same' padding) on the visible sites x (V, C) of `sites`
    (a sparse.SiteIndex)."""
    maps = None if torch.compiler.is_compiling() else sites.maps
    return _apply(_SiteDepthwiseConv, x, conv.weight, conv.bias, sites.flat, sites.shape, tuple(conv.padding), maps)


class _DepthwiseConv(torch.autograd.Function):
    """A dense depthwise conv (stride 1) with _SiteDepthwiseConv's faster CPU backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return F.conv2d(x, weight, bias, padding=padding, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        pad, c = ctx.padding, weight.shape[0]
        gx = F.conv2d(grad, weight.flip(2, 3), padding=pad, groups=c) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            n, _, h, w = x.shape
            planes = [t.transpose(0, 1).contiguous().view(c, -1) for t in (x, grad)]
            gw = planar_weight_grad(*planes, (n, h, w), pad)
        gb = grad.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class CPUDepthwiseConv2d(nn.Conv2d):
    """timm's depthwise nn.Conv2d (same parameters and state-dict keys) with the faster CPU backward, in float32
    under CPU autocast (float32_on_cpu). Other devices: nn.Conv2d unchanged."""

    def forward(self, x):
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return super().forward(x)
        return _apply(_DepthwiseConv, x, self.weight, self.bias, tuple(self.padding))


def use_cpu_depthwise_conv(model: nn.Module) -> nn.Module:
    """Switch every stride-1 depthwise nn.Conv2d of `model` to CPUDepthwiseConv2d, in place (the class only)."""
    for m in model.modules():
        if (type(m) is nn.Conv2d and m.groups == m.in_channels == m.out_channels and m.stride == (1, 1)
                and m.dilation == (1, 1) and isinstance(m.padding, tuple) and m.padding_mode == "zeros"):
            m.__class__ = CPUDepthwiseConv2d
    return model
