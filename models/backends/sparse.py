"""Sparse backend in plain PyTorch: per-site work runs only on visible sites, kept in gathered (V, C) form.

Layout: the visible sites of a stage are the rows of a (V, C) matrix, ordered by visible patch
(image, row, col) and, inside a patch's k x k sites, in Morton (Z) order. With that order every 2x2
stride-2 downsampling window is four consecutive rows, so downsampling is a reshape and one matmul,
and its output is already in the next stage's order. Only the 7x7 depthwise conv needs neighbours:
it scatters into a zero map, convolves, and gathers the visible sites back (submanifold semantics:
masked neighbours contribute zero, outputs exist only at visible sites).
"""
import torch
import torch.nn.functional as F

from ..grn import gathered_norms, grn_apply
from .dwconv import depthwise_conv
from .params import downsample_as_linear, layer_norm, linear, stem_as_linear


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
        self.sample = n_img.repeat_interleave(k * k)
        counts = torch.bincount(n_img, minlength=self.batch)
        # masks drawn by the reference rule keep the same count per image: per-image GRN stats are then a reshape
        self.uniform = bool(counts.min() == counts.max())

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
        # Stem: 4x4 stride-4 patches of the visible cells only, as rows of (c, kh, kw) pixels.
        patches = imgs.reshape(n, c_in, height // 4, 4, width // 4, 4).permute(0, 2, 4, 1, 3, 5)
        w, b = stem_as_linear(encoder.stem[0])
        x = F.linear(patches.reshape(-1, c_in * 16).index_select(0, index.flat), w, b)
        x = layer_norm(x, encoder.stem[1])
        for i, stage in enumerate(encoder.stages):
            if i > 0:
                index = SiteIndex(mask, grid, 8 >> i)
                w, b = downsample_as_linear(stage.downsample[1])
                x = layer_norm(x, stage.downsample[0])
                x = F.linear(x.reshape(-1, 4 * x.shape[1]), w, b)
            for blk in stage.blocks:
                x = x + self.block_branch(blk, x, index, encoder.grn_stats)
        out = x.new_zeros(n * grid[0] * grid[1], x.shape[1]).index_copy(0, index.flat, x)
        return out.view(n, grid[0], grid[1], -1).permute(0, 3, 1, 2)

    @staticmethod
    def block_branch(blk, x, index: SiteIndex, grn_stats):
        y = index.gather(depthwise_conv(index.scatter(x), blk.conv_dw))
        y = F.gelu(linear(layer_norm(y, blk.norm), blk.mlp.fc1))
        grn = blk.mlp.grn
        if index.uniform and grn_stats == "sample":
            y3 = y.view(index.batch, -1, y.shape[1])
            y = grn_apply(y3, torch.linalg.vector_norm(y3, dim=1, keepdim=True), grn.weight, grn.bias).view_as(y)
        else:
            y = grn_apply(y, gathered_norms(y, index.sample, index.batch, grn_stats), grn.weight, grn.bias)
        return linear(y, blk.mlp.fc2)
