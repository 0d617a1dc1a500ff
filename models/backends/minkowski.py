"""MinkowskiEngine backend: the encoder run on ME sparse tensors, as the reference FCMAE does.

It reads the same timm parameters as the other backends and converts kernels to ME's layout on the fly,
so gradients land on the timm weights. ME 0.5.4 conventions (checked in tests/test_minkowski.py):
coordinates are (batch, row, col) in stem-grid units at every stage (a stage's tensor stride is 1, 2, 4, 8);
a kernel's offset index runs over the row offset fastest, so W[c, 0, h, w] = K[h + k * w, c] for the
depthwise kernel and W[o, i, h, w] = K[h + 2 * w, i, o] for the 2x2 downsampling kernel, whose
offsets are [0, 2) (even kernels are not centred), i.e. exactly the aligned 2x2 window.

MinkowskiEngine is imported lazily, so the package works without it.
"""
import torch
import torch.nn.functional as F

from ..grn import gathered_norms, grn_apply
from ..masking import visible_map
from ..me_layout import conv_kernel, depthwise_kernel
from ..minkowski_compat import import_minkowski
from .params import layer_norm, linear


class ChannelwiseConv:
    """MinkowskiEngine's own depthwise layer, MinkowskiChannelwiseConvolution (submanifold: outputs at the input
    sites, summing visible neighbours only), run on one stage's coordinate map with the kernel and bias derived
    from timm's weights (torch.func.functional_call), so the gradients land on the timm parameters."""

    def __init__(self, ME, tensor, channels: int, kernel_size: int):
        """tensor: the stage's ME SparseTensor (its coordinate map and manager are used, not its features)."""
        self.ME, self.key, self.manager = ME, tensor.coordinate_map_key, tensor.coordinate_manager
        self.layer = ME.MinkowskiChannelwiseConvolution(channels, kernel_size=kernel_size, bias=True, dimension=2)

    def __call__(self, x: torch.Tensor, conv) -> torch.Tensor:
        """x: (V, C) features in the map's row order; conv: timm's depthwise nn.Conv2d. Returns (V, C)."""
        params = {"kernel": depthwise_kernel(conv.weight), "bias": conv.bias.view(1, -1)}
        sparse = self.ME.SparseTensor(x, coordinate_map_key=self.key, coordinate_manager=self.manager)
        return torch.func.functional_call(self.layer, params, (sparse,)).F


class MinkowskiBackend:
    name = "minkowski"

    def __call__(self, encoder, imgs, mask, keep=None):
        """imgs (N, C, H, W), mask (N, H/32 * W/32) with 1 = masked -> (N, C4, H/32, W/32), zeros at masked cells.
        `keep` is not used: MinkowskiEngine builds its coordinate maps on the host (it synchronises anyway)."""
        ME = import_minkowski()
        if torch.is_autocast_enabled(imgs.device.type):
            # ME's kernels take float32/float64 only: under --amp the encoder runs in float32, the decoder in amp
            with torch.autocast(imgs.device.type, enabled=False):
                return self(encoder, imgs.float(), mask, keep)
        n, _, height, width = imgs.shape
        grid = (height // 32, width // 32)
        # Stem dense on the full image (as the reference), then keep the visible sites. The mask decides which
        # sites exist, not the reference's "feature is non-zero" test, which a zero feature vector would fool.
        conv, norm = encoder.stem[0], encoder.stem[1]
        x = F.conv2d(imgs, conv.weight, conv.bias, stride=conv.stride)
        x = layer_norm(x.permute(0, 2, 3, 1), norm)  # (N, H/4, W/4, C)
        vis = visible_map(mask, grid, 8)[:, 0].bool()
        x = ME.SparseTensor(x[vis], coordinates=vis.nonzero().int().contiguous())
        for i, stage in enumerate(encoder.stages):
            if i > 0:
                x = self.downsample(ME, stage.downsample, x)
            dw_conv = ChannelwiseConv(ME, x, x.F.shape[1], stage.blocks[0].conv_dw.weight.shape[-1])
            sample = x.C[:, 0].long()  # image index of every site, for per-sample GRN statistics
            feats = x.F
            for blk in stage.blocks:
                feats = feats + self.block_branch(blk, feats, dw_conv, sample, n, encoder.grn_stats)
            x = ME.SparseTensor(feats, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)
        return self.densify(x, n, grid)

    @staticmethod
    def downsample(ME, layers, x):
        """Per-site LayerNorm, then the 2x2 stride-2 conv on ME: each output site sums its aligned 2x2 window."""
        from MinkowskiEngineBackend._C import ConvolutionMode

        ds_norm, ds_conv = layers[0], layers[1]
        gen = ME.KernelGenerator(kernel_size=2, stride=2, dilation=1, dimension=2)
        cm, in_key = x.coordinate_manager, x.coordinate_map_key
        out_key = cm.stride(in_key, gen.kernel_stride)
        feats = ME.MinkowskiConvolutionFunction.apply(
            layer_norm(x.F, ds_norm), conv_kernel(ds_conv.weight), gen, ConvolutionMode.DEFAULT, in_key, out_key, cm
        )
        return ME.SparseTensor(feats + ds_conv.bias, coordinate_map_key=out_key, coordinate_manager=cm)

    @staticmethod
    def block_branch(blk, x, dw_conv: ChannelwiseConv, sample, batch: int, grn_stats: str):
        """x: (V, C) site features -> the block's residual branch (V, C)."""
        y = dw_conv(x, blk.conv_dw)  # bias only at the sites, which are all visible
        y = F.gelu(linear(layer_norm(y, blk.norm), blk.mlp.fc1))
        grn = blk.mlp.grn
        y = grn_apply(y, gathered_norms(y, sample, batch, grn_stats), grn.weight, grn.bias)
        return linear(y, blk.mlp.fc2)

    @staticmethod
    def densify(x, batch: int, grid):
        """Stage-4 SparseTensor -> (N, C4, rows, cols). Scattered by hand: ME's .dense() sizes the map from the
        largest coordinate present, so it shrinks when no image keeps the last row/column (reference bug)."""
        coords = x.C.long()
        stride = x.tensor_stride[0]  # coordinates are still in stem-grid units, multiples of the stride (8)
        out = x.F.new_zeros(batch, grid[0], grid[1], x.F.shape[1])
        out = out.index_put((coords[:, 0], coords[:, 1] // stride, coords[:, 2] // stride), x.F)
        return out.permute(0, 3, 1, 2)
