"""Masked-dense reference backend: computes every site, re-zeroes masked ones. The oracle for the others.

Masked sites are re-zeroed wherever an op can make them non-zero (reference notes, 'Dense emulation'):
after the stem, after the depthwise conv (bias and leakage from visible neighbours), before the GRN
statistics (LayerNorm / Linear biases), at the block output before the residual, and after downsampling.
"""
import torch.nn.functional as F

from ..grn import dense_norms, grn_apply
from ..masking import visible_map
from .params import layer_norm, linear, run_block


class DenseBackend:
    name = "dense"

    def __call__(self, encoder, imgs, mask, keep=None):
        """`keep` (the per-image visible count, when the caller knows it) is not needed: the map is dense."""
        grid = (imgs.shape[2] // 32, imgs.shape[3] // 32)
        conv, norm = encoder.stem[0], encoder.stem[1]
        x = F.conv2d(imgs, conv.weight, conv.bias, stride=conv.stride)
        x = layer_norm(x.permute(0, 2, 3, 1), norm)  # NHWC from here on
        for i, stage in enumerate(encoder.stages):
            vis = visible_map(mask, grid, 8 >> i).to(x.dtype).permute(0, 2, 3, 1)  # (N, h, w, 1)
            if i > 0:
                ds_norm, ds_conv = stage.downsample[0], stage.downsample[1]
                x = layer_norm(x, ds_norm).permute(0, 3, 1, 2)
                x = F.conv2d(x, ds_conv.weight, ds_conv.bias, stride=2).permute(0, 2, 3, 1)
            x = x * vis
            for blk in stage.blocks:
                x = x + run_block(encoder, self.block_branch, blk, x, vis, encoder.grn_stats)
        return x.permute(0, 3, 1, 2)

    @staticmethod
    def block_branch(blk, x, vis, grn_stats):
        dw = blk.conv_dw
        y = F.conv2d(x.permute(0, 3, 1, 2), dw.weight, dw.bias, padding=dw.padding, groups=dw.groups)
        y = y.permute(0, 2, 3, 1) * vis
        y = F.gelu(linear(layer_norm(y, blk.norm), blk.mlp.fc1)) * vis
        grn = blk.mlp.grn
        y = grn_apply(y, dense_norms(y, grn_stats), grn.weight, grn.bias)
        return linear(y, blk.mlp.fc2) * vis
