"""Sparse backend in plain PyTorch: per-site work runs only on visible sites, kept in gathered (V, C) form.

Layout: the visible sites of a stage are the rows of a (V, C) matrix, ordered by visible patch
(image, row, col) and, inside a patch's k x k sites, in Morton (Z) order. With that order every 2x2
stride-2 downsampling window is four consecutive rows, so downsampling is a reshape and one matmul,
and its output is already in the next stage's order. Only the 7x7 depthwise conv needs neighbours:
it scatters into a zero map, convolves, and gathers the visible sites back (submanifold semantics:
masked neighbours contribute zero, outputs exist only at visible sites); dwconv.site_depthwise_conv
does that with maps reused across a stage's blocks. GRN and the depthwise conv have hand-written
backward passes: autograd of the composed ops made them the two slowest parts of a CPU step.
"""
import torch
import torch.nn.functional as F

from ..grn import GRN_EPS, gathered_norms, grn_apply
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
    """Where one stage's gathered rows live in the dense (N * H * W) map, and which image each belongs to."""

    def __init__(self, mask: torch.Tensor, grid, k: int):
        n_img, cell = (mask == 0).nonzero(as_tuple=True)
        rows, cols = grid
        self.batch = mask.shape[0]
        self.height, self.width = rows * k, cols * k
        dy, dx = morton_offsets(k, mask.device)
        y = (cell // cols)[:, None] * k + dy[None]
        x = (cell % cols)[:, None] * k + dx[None]
        self.flat = ((n_img[:, None] * self.height + y) * self.width + x).reshape(-1)
        self.rows, self.cols = y.reshape(-1), x.reshape(-1)
        self.sample = n_img.repeat_interleave(k * k)
        counts = torch.bincount(n_img, minlength=self.batch)
        # masks drawn by the reference rule keep the same count per image: per-image GRN stats are then a reshape
        self.uniform = bool(counts.min() == counts.max())
        self._maps = {}

    def zero_map(self, key, shape, like: torch.Tensor) -> torch.Tensor:
        """A zero buffer shared by all blocks of the stage: writers only touch visible sites, so masked sites stay
        zero and the map is allocated and zeroed once per stage instead of once per use."""
        key = (key, like.dtype, like.device)
        if key not in self._maps:
            self._maps[key] = like.new_zeros(shape)
        return self._maps[key]

    def scatter_into(self, key, x: torch.Tensor) -> torch.Tensor:
        """Like `scatter`, into the stage's reused map `key` (not autograd-safe: for use inside autograd Functions)."""
        dense = self.zero_map(key, (self.batch * self.height * self.width, x.shape[1]), x).index_copy_(0, self.flat, x)
        return dense.view(self.batch, self.height, self.width, -1).permute(0, 3, 1, 2)

    def scatter_planar(self, key, x: torch.Tensor) -> torch.Tensor:
        """(V, C) -> (C, N * H * W) planes (channel-major), zeros at masked sites, in the reused map `key`."""
        return self.zero_map(key, (x.shape[1], self.batch * self.height * self.width), x).index_copy_(1, self.flat, x.t())

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """(V, C) -> (N, C, H, W) channels-last view with zeros at masked sites."""
        dense = x.new_zeros(self.batch * self.height * self.width, x.shape[1]).index_copy(0, self.flat, x)
        return dense.view(self.batch, self.height, self.width, -1).permute(0, 3, 1, 2)

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (V, C) at the visible sites."""
        return dense.permute(0, 2, 3, 1).reshape(-1, dense.shape[1]).index_select(0, self.flat)


class SparseBackend:
    name = "sparse"

    def __call__(self, encoder, imgs, mask):
        n, c_in, height, width = imgs.shape
        grid = (height // 32, width // 32)
        index = SiteIndex(mask, grid, 8)
        # Stem: 4x4 stride-4 patches of the visible cells only, as rows of (c, kh, kw) pixels, picked straight
        # from a view of the image (no copy of the whole image in patch order).
        patches = imgs.reshape(n, c_in, height // 4, 4, width // 4, 4)[index.sample, :, index.rows, :, index.cols]
        w, b = stem_as_linear(encoder.stem[0])
        x = F.linear(patches.reshape(-1, c_in * 16), w, b)
        x = layer_norm(x, encoder.stem[1])
        for i, stage in enumerate(encoder.stages):
            if i > 0:
                index = SiteIndex(mask, grid, 8 >> i)
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
        acc = torch.promote_types(x.dtype, torch.float32)  # float32 statistics for bf16/fp16 x under autocast
        g = (x * x).sum(1, keepdim=True, dtype=acc).sqrt()
        m = g.mean(-1, keepdim=True) + GRN_EPS
        n = g / m
        ctx.save_for_backward(x, weight, g, m, n)
        scale = torch.addcmul(torch.ones_like(n), weight, n).to(torch.promote_types(x.dtype, weight.dtype))
        return torch.addcmul(bias, x, scale)

    @staticmethod
    def backward(ctx, grad):
        x, weight, g, m, n = ctx.saved_tensors
        dx = grad * x  # one (G, S, C) buffer: it holds grad * x for d, then dx (large temporaries cost on CPU)
        d = dx.sum(1, keepdim=True, dtype=g.dtype)
        dn = d * weight
        dg = dn / m - (dn * g).sum(-1, keepdim=True) / (m * m * g.shape[-1])
        torch.mul(grad, 1 + weight * n, out=dx).addcmul_(x, torch.where(g > 0, dg / g, 0.0))
        return dx.to(x.dtype), (d * n).sum((0, 1)).to(weight.dtype), grad.sum((0, 1)).to(weight.dtype)
