"""Naive masking, the approximation some ports make (NVIDIA TAO's FCMAE port): mask once, then run dense.

The stem runs on the whole image and its output is zeroed at masked sites, once; every later op (depthwise conv,
LayerNorm, MLP, GRN over the whole map, downsampling) runs densely on the full map with no re-masking. Masked
sites therefore become non-zero again after the first depthwise conv (bias, and visible neighbours within 3
sites), and from then on information flows through them: the encoder sees more than the visible patches, unlike
the reference's sparse encoder (reference notes, 'Dense emulation'). Kept as an ablation arm, not for use.

Same interface as the other backends; only the output is zeroed at masked cells, as theirs is.
"""
import torch.nn.functional as F

from ..grn import dense_norms, grn_apply
from ..masking import visible_map
from .params import layer_norm, linear, run_block


class NaiveBackend:
    name = "naive"

    def __call__(self, encoder, imgs, mask, keep=None):
        """imgs (N, C, H, W), mask (N, H/32 * W/32) with 1 = masked -> (N, C4, H/32, W/32), zeros at masked cells.
        `keep` (the per-image visible count, when the caller knows it) is not needed: the map is dense."""
        grid = (imgs.shape[2] // 32, imgs.shape[3] // 32)
        conv, norm = encoder.stem[0], encoder.stem[1]
        x = F.conv2d(imgs, conv.weight, conv.bias, stride=conv.stride)
        x = layer_norm(x.permute(0, 2, 3, 1), norm)  # NHWC from here on
        x = x * visible_map(mask, grid, 8).to(x.dtype).permute(0, 2, 3, 1)  # the only masking before the output
        for i, stage in enumerate(encoder.stages):
            if i > 0:
                ds_norm, ds_conv = stage.downsample[0], stage.downsample[1]
                x = layer_norm(x, ds_norm).permute(0, 3, 1, 2)
                x = F.conv2d(x, ds_conv.weight, ds_conv.bias, stride=2).permute(0, 2, 3, 1)
            for blk in stage.blocks:
                x = x + run_block(encoder, self.block_branch, blk, x, encoder.grn_stats)
        return (x * visible_map(mask, grid, 1).to(x.dtype).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    @staticmethod
    def block_branch(blk, x, grn_stats):
        """timm's block (no layer scale, no drop-path in pretraining) on the whole NHWC map."""
        dw = blk.conv_dw
        y = F.conv2d(x.permute(0, 3, 1, 2), dw.weight, dw.bias, padding=dw.padding, groups=dw.groups)
        y = F.gelu(linear(layer_norm(y.permute(0, 2, 3, 1), blk.norm), blk.mlp.fc1))
        grn = blk.mlp.grn
        y = grn_apply(y, dense_norms(y, grn_stats), grn.weight, grn.bias)  # statistics over every site, masked too
        return linear(y, blk.mlp.fc2)
