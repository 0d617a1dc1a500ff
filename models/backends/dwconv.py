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
        n, c, h, w = x.shape
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, weight.flip(2, 3), padding=pad, groups=c)
        if ctx.needs_input_grad[1]:
            xp = F.pad(x, (pad[1], pad[1], pad[0], pad[0])).reshape(1, n * c, h + 2 * pad[0], w + 2 * pad[1])
            kernel = grad.reshape(n * c, 1, h, w)
            grad_w = F.conv2d(xp.contiguous(), kernel.contiguous(), groups=n * c)
            grad_w = grad_w.reshape(n, c, *weight.shape[2:]).sum(0).unsqueeze(1)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


def depthwise_conv(x, conv):
    """`conv` is timm's depthwise nn.Conv2d (stride 1, 'same' padding); x is (N, C, H, W)."""
    if x.device.type != "cpu" or not torch.is_grad_enabled():
        return F.conv2d(x, conv.weight, conv.bias, padding=conv.padding, groups=conv.groups)
    return _DepthwiseConv.apply(x, conv.weight, conv.bias, tuple(conv.padding))
