"""The hand-written backward passes (sparse._GroupedGRN, dwconv._SiteDepthwiseConv) against finite differences
(torch.autograd.gradcheck, float64)."""
import pytest
import torch
import torch.nn.functional as F

from models.backends.dwconv import _SiteDepthwiseConv
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
