"""Depthwise 7x7 convolution with a faster CPU backward.

PyTorch's CPU backward for the weight of a depthwise conv runs several times slower than the forward. Both
gradients are convolutions themselves: grad_input is the depthwise conv of grad_output with the flipped kernel,
and grad_weight[c] = sum_n corr(x[n, c], grad_output[n, c]) is one depthwise conv over the N*C maps with the
gradient as a (H, W) kernel and a 7x7 output. On CUDA the native kernels are used unchanged.
"""
import torch
import torch.nn.functional as F


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return F.conv2d(x, weight, bias, padding=padding, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        pad = ctx.padding
        # under autocast the gradient arrives in bf16/fp16: compute in its dtype, return in the inputs' dtypes
        x_dtype, w_dtype = x.dtype, weight.dtype
        x, weight = x.to(grad.dtype), weight.to(grad.dtype)
        n, c, h, w = x.shape
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, weight.flip(2, 3), padding=pad, groups=c).to(x_dtype)
        if ctx.needs_input_grad[1]:
            xp = F.pad(x, (pad[1], pad[1], pad[0], pad[0])).reshape(1, n * c, h + 2 * pad[0], w + 2 * pad[1])
            kernel = grad.reshape(n * c, 1, h, w)
            grad_w = F.conv2d(xp.contiguous(), kernel.contiguous(), groups=n * c)
            grad_w = grad_w.reshape(n, c, *weight.shape[2:]).sum(0).unsqueeze(1).to(w_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3)).to(w_dtype)
        return grad_x, grad_w, grad_b, None


def depthwise_conv(x, conv):
    """`conv` is timm's depthwise nn.Conv2d (stride 1, 'same' padding); x is (N, C, H, W)."""
    if x.device.type != "cpu" or not torch.is_grad_enabled():
        return F.conv2d(x, conv.weight, conv.bias, padding=conv.padding, groups=conv.groups)
    return _DepthwiseConv.apply(x, conv.weight, conv.bias, tuple(conv.padding))


class _SiteDepthwiseConv(torch.autograd.Function):
    """Submanifold depthwise conv on gathered sites: (V, C) rows -> (V, C) rows.

    `sites` (a sparse.SiteIndex) scatters rows into zero maps that every block of a stage reuses (writes touch
    visible sites only, so masked sites stay zero and a map is zeroed once per stage, not once per use) and gathers
    them back. Only the (V, C) rows are saved for backward, not the 2.6x larger map (at mask ratio 0.6).
    CPU backward (measured per stage at atto/224/batch 32, forward + backward: 58/21/10/5 ms against PyTorch's
    77/35/18/13 ms): grad_input as a conv of the channels-last gradient map with the flipped kernel, grad_weight
    as one conv over C*N planes (module docstring), both maps scattered straight into planar (C, N*H*W) buffers,
    which costs less than scattering channels-last and transposing. Elsewhere PyTorch's own backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, sites, padding):
        ctx.save_for_backward(x, weight)
        ctx.sites, ctx.padding = sites, padding
        return sites.gather(F.conv2d(sites.scatter_into("x", x), weight, bias, padding=padding, groups=weight.shape[0]))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        sites, pad = ctx.sites, ctx.padding
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # under autocast the gradient arrives in bf16/fp16: compute in its dtype, return in the inputs' dtypes
        xg, w = x.to(grad.dtype), weight.to(grad.dtype)
        c = w.shape[0]
        gmap = sites.scatter_into("grad", grad)
        if grad.device.type != "cpu":
            gx, gw, gb = torch.ops.aten.convolution_backward(
                gmap, sites.scatter_into("x", xg), w, [c], (1, 1), pad, (1, 1), False, (0, 0), c, [need_x, need_w, need_b])
            gx = sites.gather(gx) if need_x else None
        else:
            gx = sites.gather(F.conv2d(gmap, w.flip(2, 3), padding=pad, groups=c)) if need_x else None
            gw = None
            if need_w:
                n, h, wd = sites.batch, sites.height, sites.width
                xp, gp = sites.scatter_planar("x_planar", xg), sites.scatter_planar("grad_planar", grad)
                gw = F.conv2d(xp.view(1, c * n, h, wd), gp.view(c * n, 1, h, wd), padding=pad, groups=c * n)
                gw = gw.view(c, n, *w.shape[2:]).sum(1).unsqueeze(1)
            gb = grad.sum(0) if need_b else None  # the gradient is zero at masked sites: the rows hold all of it
        return (None if gx is None else gx.to(x.dtype), None if gw is None else gw.to(weight.dtype),
                None if gb is None else gb.to(weight.dtype), None, None)


def site_depthwise_conv(x, conv, sites):
    """`conv` (timm's depthwise nn.Conv2d, stride 1, 'same' padding) on the visible sites x (V, C) of `sites`."""
    return _SiteDepthwiseConv.apply(x, conv.weight, conv.bias, sites, tuple(conv.padding))
