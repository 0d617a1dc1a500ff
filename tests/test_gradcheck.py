"""The hand-written backward passes (sparse._GroupedGRN, dwconv._SiteDepthwiseConv, dwconv._DepthwiseConv) against
finite differences (torch.autograd.gradcheck, float64), and their reduced-precision paths against float64."""
import copy

import pytest
import torch
import torch.nn.functional as F

from models.backends.dwconv import CPUDepthwiseConv2d, _DepthwiseConv, _SiteDepthwiseConv, use_cpu_depthwise_conv
from models.backends.sparse import SiteIndex, _GroupedGRN, visible_cells
from models.grn import dense_norms, grn_apply


@pytest.mark.parametrize("groups", [1, 3], ids=["batch", "sample"])  # one group for the batch, one per image
def test_grouped_grn_gradcheck(groups):
    torch.manual_seed(groups)
    x = torch.randn(groups, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_GroupedGRN.apply, (x, weight, bias))
    # and the forward is grn_apply's: norms over each group's sites
    ref = grn_apply(x, dense_norms(x.unsqueeze(2), "sample").squeeze(2), weight, bias)
    assert torch.allclose(_GroupedGRN.apply(x, weight, bias), ref, rtol=1e-12, atol=1e-12)


def sites_for(mask, grid, k):
    sample, cell, uniform = visible_cells(mask, None)
    return SiteIndex(sample, cell, mask.shape[0], grid, k, uniform)


# 3x3 cells of 2x2 sites: visible cells next to masked ones, so the 5x5 kernel reaches masked (zero) neighbours
MASKS = {
    "sample": torch.tensor([[0.0, 1, 0, 1, 0, 1, 1, 1, 0]]),
    "batch": torch.tensor([[0.0, 1, 0, 1, 0, 1, 1, 1, 0], [1.0, 0, 1, 1, 1, 0, 0, 1, 1]]),  # 4 and 3 visible cells
}


@pytest.mark.parametrize("cache", [False, True], ids=["fresh-maps", "reused-maps"])
@pytest.mark.parametrize("case", list(MASKS))
def test_site_depthwise_conv_gradcheck(case, cache):
    torch.manual_seed(0)
    mask = MASKS[case]
    sites = sites_for(mask, (3, 3), 2)
    c, k = 3, 5
    x = torch.randn(sites.flat.numel(), c, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c, 1, k, k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(c, dtype=torch.float64, requires_grad=True)
    maps = {} if cache else None

    def conv(x, weight, bias):
        return _SiteDepthwiseConv.apply(x, weight, bias, sites.flat, sites.shape, (k // 2, k // 2), maps)

    assert torch.autograd.gradcheck(conv, (x, weight, bias))
    # submanifold semantics: masked neighbours count as zero, outputs at the visible sites only
    n, h, w = sites.shape
    dense = torch.zeros(n * h * w, c, dtype=torch.float64).index_copy(0, sites.flat, x.detach())
    dense = dense.view(n, h, w, c).permute(0, 3, 1, 2)
    ref = F.conv2d(dense, weight.detach(), bias.detach(), padding=k // 2, groups=c)
    ref = ref.permute(0, 2, 3, 1).reshape(-1, c)[sites.flat]
    assert torch.allclose(conv(x, weight, bias), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_grn_low_precision_close_to_float64(dtype):
    """bf16 squares, sums and products stay in bf16 (float32 accumulation), fp16 ones in float32: both within a
    few bf16/fp16 ulps of float64, and the output keeps x's dtype (fc2 reads it so under autocast)."""
    torch.manual_seed(0)
    x64 = torch.randn(4, 300, 16, dtype=torch.float64) * 20  # fp16 squares of 20-sigma values overflow at 256
    weight, bias = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    grad64 = torch.randn(4, 300, 16, dtype=torch.float64)
    outs = []
    for xd, w, b, g in ((x64, weight, bias, grad64), (x64.to(dtype), weight.float(), bias.float(), grad64.to(dtype))):
        xd, w, b = (t.clone().requires_grad_() for t in (xd, w, b))
        out = _GroupedGRN.apply(xd, w, b)
        out.backward(g)
        outs.append((out, xd.grad, w.grad, b.grad))
    (ref, *ref_grads), (out, *grads) = outs
    assert out.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == torch.float32
    assert torch.isfinite(out).all() and all(torch.isfinite(gr).all() for gr in grads)
    for a, b in [(out, ref)] + list(zip(grads, ref_grads)):
        assert (a.double() - b).norm() / b.norm() < 2e-2


@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
def test_depthwise_conv_gradcheck(layout):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    if layout == "channels-last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(3, 1, 7, 7, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: _DepthwiseConv.apply(*a, (3, 3)), (x, weight, bias))


def test_cpu_depthwise_conv_module_matches_conv2d():
    """The decoder's depthwise conv swap: same parameters, outputs and gradients as nn.Conv2d; under bf16 autocast
    it computes in float32 (a float32 output close to the bf16 conv's)."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 7, padding=3, groups=8), torch.nn.Conv2d(8, 4, 1))
    ours = use_cpu_depthwise_conv(copy.deepcopy(ref))
    assert type(ours[0]) is CPUDepthwiseConv2d and type(ours[1]) is torch.nn.Conv2d  # 1x1: not depthwise
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 8, 9, 9)
    a, b = ref(x), ours(x)
    a.square().sum().backward()
    b.square().sum().backward()
    assert torch.allclose(a, b, atol=1e-6)
    for p, q in zip(ref.parameters(), ours.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = ours[0](x.bfloat16())
    assert low.dtype == torch.float32 and torch.allclose(low, ours[0](x.bfloat16().float()), atol=1e-5)
