"""MinkowskiEngine backend pieces: kernel layout conversions against F.conv2d, densifying, and the missing-ME error.

End-to-end agreement with the dense oracle (loss, prediction, every gradient) is in test_agreement.py.
"""
import sys

import pytest
import torch
import torch.nn.functional as F

from models import SparseConvNeXtV2
from models.backends import make_backend
from models.backends.minkowski import ChannelwiseConv, conv_kernel
from tests.conftest import HAS_MINKOWSKI, TINY, randomize_grn

needs_me = pytest.mark.skipif(not HAS_MINKOWSKI, reason="MinkowskiEngine not installed (tools/setup.sh builds it)")


@pytest.fixture
def ME():
    from models.minkowski_compat import import_minkowski

    return import_minkowski()


def to_sparse(ME, x, vis, stride=1):
    """Dense (N, C, H, W) at sites vis (N, H, W) -> SparseTensor on coordinates scaled by the tensor stride."""
    coords = vis.nonzero()
    coords[:, 1:] *= stride
    return ME.SparseTensor(x.permute(0, 2, 3, 1)[vis], coordinates=coords.int().contiguous(), tensor_stride=stride)


def at_sites(dense, coords, stride=1):
    """Rows of a dense (N, C, H, W) map at ME coordinates (V, 3) in units of `stride`."""
    c = coords.long()
    return dense.permute(0, 2, 3, 1)[c[:, 0], c[:, 1] // stride, c[:, 2] // stride]


@needs_me
@pytest.mark.parametrize("stride", [1, 2])  # stride 2: a later stage, where ME dilates offsets by the tensor stride
def test_depthwise_kernel_mapping_matches_conv2d(ME, stride):
    torch.manual_seed(0)
    c, k = 5, 7
    vis = torch.rand(2, 9, 11) < 0.5  # arbitrary pattern: not aligned to any window
    x = torch.randn(2, c, 9, 11, dtype=torch.float64) * vis[:, None]
    conv = torch.nn.Conv2d(c, c, k, padding=k // 2, groups=c).double()  # timm's depthwise conv
    sparse = to_sparse(ME, x, vis, stride)

    ours = ChannelwiseConv(ME, sparse, c, k)(sparse.F, conv)  # ME's MinkowskiChannelwiseConvolution
    ref = at_sites(conv(x), sparse.C, stride)  # masked neighbours are zero in x: submanifold = dense at the sites
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)

    # the kernel conversion carries the gradients to the timm weight and bias
    grads = torch.autograd.grad(ours.square().sum(), [conv.weight, conv.bias])
    ref_grads = torch.autograd.grad(ref.square().sum(), [conv.weight, conv.bias])
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)


@needs_me
def test_downsample_kernel_mapping_matches_conv2d(ME):
    from MinkowskiEngineBackend._C import ConvolutionMode

    torch.manual_seed(1)
    c_in, c_out = 3, 4
    vis = (torch.rand(2, 4, 5) < 0.5).repeat_interleave(2, 1).repeat_interleave(2, 2)  # whole 2x2 windows, as the mask
    x = torch.randn(2, c_in, 8, 10, dtype=torch.float64) * vis[:, None]
    weight = torch.randn(c_out, c_in, 2, 2, dtype=torch.float64, requires_grad=True)
    sparse = to_sparse(ME, x, vis)

    gen = ME.KernelGenerator(kernel_size=2, stride=2, dimension=2)
    cm = sparse.coordinate_manager
    out_key = cm.stride(sparse.coordinate_map_key, gen.kernel_stride)
    ours = ME.MinkowskiConvolutionFunction.apply(
        sparse.F, conv_kernel(weight), gen, ConvolutionMode.DEFAULT, sparse.coordinate_map_key, out_key, cm
    )
    coords = cm.get_coordinates(out_key)
    assert len(coords) == vis[:, ::2, ::2].sum()  # exactly the kept windows
    ref = at_sites(F.conv2d(x, weight, stride=2), coords, stride=2)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)

    grad = torch.autograd.grad(ours.square().sum(), weight)[0]
    ref_grad = torch.autograd.grad(ref.square().sum(), weight)[0]
    assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-12)


@needs_me
def test_output_keeps_full_grid_when_last_row_and_column_are_masked():
    """Batch 1 with only the top-left cell visible: ME's .dense() would shrink the map; ours must not."""
    torch.manual_seed(2)
    encoder = randomize_grn(SparseConvNeXtV2(TINY, backend="minkowski"))
    imgs = torch.randn(1, 3, 64, 96)
    mask = torch.ones(1, 6)
    mask[0, 0] = 0
    with torch.no_grad():
        out = encoder(imgs, mask)
        encoder.set_backend("dense")
        ref = encoder(imgs, mask)
    assert out.shape == (1, 64, 2, 3)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_missing_minkowski_raises_install_hint(monkeypatch):
    backend = make_backend("minkowski")  # constructing it must not need MinkowskiEngine
    monkeypatch.setitem(sys.modules, "MinkowskiEngine", None)  # makes `import MinkowskiEngine` fail
    with pytest.raises(ImportError, match="tools/setup.sh"):
        backend(None, torch.zeros(1, 3, 32, 32), torch.zeros(1, 1))
