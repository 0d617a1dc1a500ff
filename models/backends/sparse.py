"""Sparse backend in plain PyTorch: per-site work runs only on visible sites, kept in gathered (V, C) form.

Layout: the visible sites of a stage are the rows of a (V, C) matrix, ordered by visible patch
(image, row, col) and, inside a patch's k x k sites, in Morton (Z) order. With that order every 2x2
stride-2 downsampling window is four consecutive rows, so downsampling is a reshape and one matmul,
and its output is already in the next stage's order. Only the 7x7 depthwise conv needs neighbours:
it scatters into a zero map, convolves, and gathers the visible sites back (submanifold semantics:
masked neighbours contribute zero, outputs exist only at visible sites); dwconv.site_depthwise_conv
does that with maps reused across a stage's blocks. GRN and the depthwise conv have hand-written
backward passes: autograd of the composed ops made them the two slowest parts of a CPU step.

On the FCMAE path (`keep` given: every image keeps the same number of cells) all index tensors have static
shapes and nothing reads a device value on the host, so a training step never synchronises with an accelerator,
GRN's per-image statistics are always a reshape (`uniform`), and torch.compile traces the backend with
fullgraph=True (the autograd Functions take tensors and ints; their zero-map cache is off while compiling).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ..grn import GRN_EPS, gathered_norms, grn_apply, low_precision, sums_of_squares
from ..masking import split_cells
from .dwconv import site_depthwise_conv
from .params import downsample_as_linear, layer_norm, linear, run_block, stem_as_linear


def morton_offsets(k: int, device=None):
    """(dy, dx) of the k*k sites of a patch in Morton order; k is a power of two."""
    m = torch.arange(k * k, device=device)
    dy = torch.zeros_like(m)
    dx = torch.zeros_like(m)
    for b in range(max(k.bit_length() - 1, 0)):
        dx |= ((m >> (2 * b)) & 1) << b
        dy |= ((m >> (2 * b + 1)) & 1) << b
    return dy, dx


class SiteIndex:
    """Where one stage's gathered rows live in the dense (N * H * W) map, and which image each belongs to.

    Built from the visible cells (`sample`, `cell`: (V0,) image and row-major cell index of every visible mask
    cell, in (image, row, col) order); each cell holds k x k sites in Morton order. Holds tensors and ints only,
    no device values read on the host. `maps` caches the zero maps that every block of a stage reuses
    (dwconv.site_depthwise_conv) in eager mode.
    """

    def __init__(self, sample: torch.Tensor, cell: torch.Tensor, batch: int, grid, k: int, uniform: bool):
        rows, cols = grid
        self.batch = batch
        self.height, self.width = rows * k, cols * k
        dy, dx = morton_offsets(k, cell.device)
        y = (cell // cols)[:, None] * k + dy[None]
        x = (cell % cols)[:, None] * k + dx[None]
        self.flat = ((sample[:, None] * self.height + y) * self.width + x).reshape(-1)
        self.rows, self.cols = y.reshape(-1), x.reshape(-1)
        self.sample = sample[:, None].expand(-1, k * k).reshape(-1)
        # every image keeps the same number of sites: per-image GRN statistics are then a reshape
        self.uniform = uniform
        self.maps = {}

    @property
    def shape(self):
        """(N, H, W) of the stage's dense map."""
        return self.batch, self.height, self.width


def visible_cells(mask: torch.Tensor, keep: Optional[int]):
    """(sample, cell, uniform) of the visible cells of mask (N, L), in (image, row, col) order.

    With `keep` (the FCMAE path: every image keeps exactly `keep` cells, models.masking.random_mask) the indices
    come from a stable sort of the mask: static shapes, no host synchronisation, traceable by torch.compile.
    Without it (any mask, e.g. an API caller's with a different count per image) they come from nonzero, which
    reads the count on the host; a mask whose images keep different counts takes GRN's general gathered path."""
    n = mask.shape[0]
    if keep is not None:
        cell = split_cells(mask, keep)[0].reshape(-1)
        sample = torch.arange(n, device=mask.device)[:, None].expand(-1, keep).reshape(-1)
        return sample, cell, True
    sample, cell = (mask == 0).nonzero(as_tuple=True)
    counts = torch.bincount(sample, minlength=n)
    return sample, cell, bool(counts.min() == counts.max())


class SparseBackend:
    name = "sparse"

    def __call__(self, encoder, imgs, mask, keep: Optional[int] = None):
        n, c_in, height, width = imgs.shape
        grid = (height // 32, width // 32)
        sample, cell, uniform = visible_cells(mask, keep)
        index = SiteIndex(sample, cell, n, grid, 8, uniform)
        # Stem: 4x4 stride-4 patches of the visible cells only, as rows of (c, kh, kw) pixels, picked straight
        # from a view of the image (no copy of the whole image in patch order).
        patches = imgs.reshape(n, c_in, height // 4, 4, width // 4, 4)[index.sample, :, index.rows, :, index.cols]
        w, b = stem_as_linear(encoder.stem[0])
        x = F.linear(patches.reshape(-1, c_in * 16), w, b)
        x = layer_norm(x, encoder.stem[1])
        for i, stage in enumerate(encoder.stages):
            if i > 0:
                index = SiteIndex(sample, cell, n, grid, 8 >> i, uniform)
                w, b = downsample_as_linear(stage.downsample[1])
                x = layer_norm(x, stage.downsample[0])
                x = F.linear(x.reshape(-1, 4 * x.shape[1]), w, b)
            for blk in stage.blocks:
                x = x + run_block(encoder, self.block_branch, blk, x, index, encoder.grn_stats)
        out = x.new_zeros(n * grid[0] * grid[1], x.shape[1]).index_copy(0, index.flat, x)
        return out.view(n, grid[0], grid[1], -1).permute(0, 3, 1, 2)

    @staticmethod
    def block_branch(blk, x, index: SiteIndex, grn_stats):
        y = site_depthwise_conv(x, blk.conv_dw, index)
        y = F.gelu(linear(layer_norm(y, blk.norm), blk.mlp.fc1))
        grn = blk.mlp.grn
        if grn_stats == "batch" or index.uniform:
            # every group of sites has the same size: (groups, sites, C), one group per image or one for the batch
            y = _GroupedGRN.apply(y.view(1 if grn_stats == "batch" else index.batch, -1, y.shape[1]),
                                  grn.weight, grn.bias).view_as(y)
        else:
            y = grn_apply(y, gathered_norms(y, index.sample, index.batch, grn_stats), grn.weight, grn.bias)
        return linear(y, blk.mlp.fc2)


class _GroupedGRN(torch.autograd.Function):
    """GRN on (G, S, C) with statistics per group over its S sites, with a hand-written backward.

    Same maths as grn.grn_apply, out = x * (1 + gamma * N) + beta, but a few passes over x instead of the dozen
    autograd makes of the composed ops (vector_norm over a middle dim is also slow on CPU). G = ||x||_2 over S,
    N = G / (mean_c G + eps); with d = sum_s(grad * x):
        dgamma = sum_g d * N    dbeta = sum grad    dN = d * gamma
        dG = dN / m - sum_c(dN * G) / (C * m^2)   (m = mean_c G + eps)
        dx = grad * (1 + gamma * N) + x * dG / G  (0 where G = 0, like vector_norm's gradient)
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        g = sums_of_squares(x, 1).sqrt()  # float32 statistics for bf16/fp16 x; no autograd here: g = 0 is safe
        m = g.mean(-1, keepdim=True) + GRN_EPS
        n = g / m
        ctx.save_for_backward(x, weight, g, m, n)
        scale = torch.addcmul(torch.ones_like(n), weight, n)
        if low_precision(x):  # the output stays in x's dtype: fc2 reads it so, and a float32 (G, S, C) copy costs
            return torch.addcmul(bias.to(x.dtype), x, scale.to(x.dtype))
        return torch.addcmul(bias, x, scale.to(torch.promote_types(x.dtype, weight.dtype)))

    @staticmethod
    def backward(ctx, grad):
        x, weight, g, m, n = ctx.saved_tensors
        # bf16 products are safe (float32's range) and its sums accumulate in float32; fp16 products of a scaled
        # gradient overflow, so fp16 (and float32/64) work in the statistics' dtype
        work = x.dtype if x.dtype == torch.bfloat16 else g.dtype
        grad, xw = grad.to(work), x.to(work)
        dx = grad * xw  # one (G, S, C) buffer: it holds grad * x for d, then dx (large temporaries cost on CPU)
        d = dx.sum(1, keepdim=True).to(g.dtype)
        dn = d * weight
        dg = dn / m - (dn * g).sum(-1, keepdim=True) / (m * m * g.shape[-1])
        torch.mul(grad, (1 + weight * n).to(work), out=dx).addcmul_(xw, torch.where(g > 0, dg / g, 0.0).to(work))
        return dx.to(x.dtype), (d * n).sum((0, 1)).to(weight.dtype), grad.sum((0, 1)).to(weight.dtype)
