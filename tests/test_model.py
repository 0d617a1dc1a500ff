"""FCMAE model contract: timm names and shapes, masks, loss math, input validation."""
import re

import numpy as np
import pytest
import timm
import torch

from models import VARIANTS, create_fcmae
from models.masking import mask_grid, num_visible, random_mask
from models.variants import get_variant
from tests.conftest import TINY


@pytest.mark.parametrize("name", list(VARIANTS))
def test_encoder_has_exactly_timms_names_and_shapes(name):
    with torch.device("meta"):
        ours = create_fcmae(name).encoder.state_dict()
        ref = timm.create_model(name, num_classes=1000).state_dict()
    ref_body = {k: v for k, v in ref.items() if not k.startswith("head.")}
    assert set(ours) == set(ref_body)
    for k, v in ref_body.items():
        assert ours[k].shape == v.shape, k
    v = VARIANTS[name]
    assert ours["stem.0.weight"].shape[0] == v.dims[0]
    assert sum(1 for k in ours if k.endswith("conv_dw.weight")) == sum(v.depths)


def test_test_variant_is_atto_in_miniature():
    """convnextv2_test, for tests only, is what timm builds for atto with fewer blocks and narrower stages: module
    for module the same (GRN, 1x1-conv MLP, no layer scale, norms and their eps) once the widths are renamed;
    timm's keyword arguments reach it; it is not offered to users."""
    tiny, atto = VARIANTS[TINY], VARIANTS["convnextv2_atto"]
    with torch.device("meta"):
        ours, ref = timm.create_model(TINY), timm.create_model(atto.name)

    def renamed(module, i):  # stage i's widths (and the previous stage's, for a downsample) written as atto's
        widths = {tiny.dims[i]: atto.dims[i], 4 * tiny.dims[i]: 4 * atto.dims[i]}
        widths.update({tiny.dims[i - 1]: atto.dims[i - 1]} if i else {})
        return re.sub(r"\b\d+\b", lambda m: str(widths.get(int(m.group()), m.group())), repr(module))

    assert renamed(ours.stem, 0) == repr(ref.stem) and renamed(ours.head, 3) == repr(ref.head)
    for i in range(4):
        assert len(ours.stages[i].blocks) == tiny.depths[i]
        assert renamed(ours.stages[i].downsample, i) == repr(ref.stages[i].downsample)
        for block in ours.stages[i].blocks:
            assert renamed(block, i) == repr(ref.stages[i].blocks[0]) and block.gamma is None
    model = timm.create_model(TINY, num_classes=7, in_chans=2, drop_path_rate=0.3, head_init_scale=0.001)
    assert model.stem[0].in_channels == 2 and model.head.fc.out_features == 7
    assert model.stages[3].blocks[0].drop_path.drop_prob == pytest.approx(0.3)
    assert model.head.fc.weight.std() < 1e-4  # std 0.02 scaled by head_init_scale
    assert tiny.test_only and not atto.test_only
    with pytest.raises(ValueError) as e:
        get_variant("convnextv2_giant")
    assert TINY not in str(e.value)
    from fcmae.pretrain.options import build_parser as pretrain_parser
    from finetune.options import build_parser as finetune_parser

    for parser in (pretrain_parser(), finetune_parser()):
        assert "convnextv2_atto" in parser.format_help() and TINY not in parser.format_help()


def test_decoder_layout():
    model = create_fcmae(TINY)
    sd = model.state_dict()
    assert sd["proj.weight"].shape == (512, 64, 1, 1)
    assert sd["mask_token"].shape == (1, 512, 1, 1)
    assert sd["pred.weight"].shape == (3072, 512, 1, 1)
    assert sd["decoder.0.mlp.grn.weight"].shape == (2048,)
    assert len(model.decoder) == 1
    assert len(create_fcmae(TINY, decoder_depth=2, decoder_dim=64).decoder) == 2
    sd4 = create_fcmae(TINY, in_chans=4).state_dict()
    assert sd4["pred.weight"].shape == (32 * 32 * 4, 512, 1, 1) and sd4["encoder.stem.0.weight"].shape == (24, 4, 4, 4)


def test_random_mask_rules():
    torch.manual_seed(0)
    mask = random_mask(5, 49, 0.6)
    assert mask.shape == (5, 49)
    assert torch.all(mask.sum(1) == 49 - 19)  # keeps int(49 * 0.4) = 19
    assert not torch.equal(mask[0], mask[1])  # independent per image
    assert num_visible(12, 0.6) == 4
    with pytest.raises(ValueError, match="mask ratio"):
        num_visible(49, 1.0)
    with pytest.raises(ValueError, match="leaves no visible patch"):
        num_visible(1, 0.6)
    with pytest.raises(ValueError, match="not divisible"):
        mask_grid(224, 200)
    assert mask_grid(192, 256) == (6, 8)


def hand_loss(imgs, cells):
    """Per-patch normalised target over all C channels (unbiased var, eps 1e-6), per-patch MSE, mean over the
    given (image, cell, prediction row) triples. imgs (N, C, H, W) numpy; cells on a grid W/32 wide."""
    cols = imgs.shape[3] // 32
    total = 0.0
    for n, cell, row in cells:
        r, c = divmod(cell, cols)
        patch = imgs[n, :, r * 32:(r + 1) * 32, c * 32:(c + 1) * 32].transpose(1, 2, 0).reshape(-1)  # (p, q, c)
        target = (patch - patch.mean()) / np.sqrt(patch.var(ddof=1) + 1e-6)
        total += np.mean((row - target) ** 2)
    return total / len(cells)


@pytest.mark.parametrize("in_chans", [1, 3, 4])
def test_loss_matches_hand_computation(in_chans):
    """forward_loss of a full prediction map (any mask, here a different count per image)."""
    torch.manual_seed(0)
    model = create_fcmae(TINY, decoder_dim=64, in_chans=in_chans).double()
    imgs = torch.randn(2, in_chans, 64, 32, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    pred = torch.randn(2, 1024 * in_chans, 2, 1, dtype=torch.float64)
    cells = [(n, cell, pred[n, :, cell, 0].numpy()) for n in range(2) for cell in range(2) if mask[n, cell] == 1]
    loss = model.forward_loss(imgs, pred, mask)
    assert loss.item() == pytest.approx(hand_loss(imgs.numpy(), cells), rel=1e-12)


@pytest.mark.parametrize("in_chans", [1, 3, 4])
def test_forward_loss_and_masked_rows_match_hand_computation(in_chans):
    """forward returns the prediction at the masked cells only, (N, M, 32*32*C) in increasing cell order, and the
    mean of their per-patch MSEs."""
    torch.manual_seed(1)
    model = create_fcmae(TINY, decoder_dim=64, in_chans=in_chans).double()
    imgs = torch.randn(2, in_chans, 64, 96, dtype=torch.float64)
    mask = random_mask(2, 6, 0.6)  # keeps int(6 * 0.4) = 2, so M = 4
    with torch.no_grad():
        loss, pred, out_mask = model(imgs, mask)
    assert pred.shape == (2, 4, 1024 * in_chans) and torch.equal(out_mask, mask)
    cells = []
    for n in range(2):
        masked = [cell for cell in range(6) if mask[n, cell] == 1]
        cells += [(n, cell, pred[n, j].numpy()) for j, cell in enumerate(masked)]
    assert loss.item() == pytest.approx(hand_loss(imgs.numpy(), cells), rel=1e-12)


@pytest.mark.parametrize("size,batch", [((64, 96), 1), ((96, 64), 2)])
def test_forward_shapes_any_batch_and_nonsquare(size, batch):
    model = create_fcmae(TINY)
    loss, pred, mask = model(torch.randn(batch, 3, *size))
    num_patches = (size[0] // 32) * (size[1] // 32)
    assert pred.shape == (batch, num_patches - num_visible(num_patches, 0.6), 3072)
    assert mask.shape == (batch, num_patches)
    assert torch.isfinite(loss)
    full = model.predict(torch.randn(batch, 3, *size), mask)
    assert full.shape == (batch, 3072, size[0] // 32, size[1] // 32)


def test_bad_inputs_are_clear_errors():
    model = create_fcmae(TINY, decoder_dim=64)
    with pytest.raises(ValueError, match="not divisible by the patch size 32"):
        model(torch.randn(1, 3, 64, 50))
    with pytest.raises(ValueError, match=r"\(N>=1, 3, H, W\)"):
        model(torch.randn(0, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\(N>=1, 3, H, W\)"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="mask must have shape"):
        model(torch.randn(2, 3, 64, 64), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="only 0"):
        model(torch.randn(1, 3, 64, 64), torch.full((1, 4), 0.5))
    with pytest.raises(ValueError, match="exactly 1 visible cells"):  # int(4 * 0.4) = 1 per image
        model(torch.randn(2, 3, 64, 64), torch.tensor([[0.0, 1, 1, 1], [0, 0, 1, 1]]))
    with pytest.raises(ValueError, match=r"\(N>=1, 1, H, W\) \(the model's in_chans\)"):
        create_fcmae(TINY, decoder_dim=64, in_chans=1)(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="in_chans"):
        create_fcmae(TINY, in_chans=0)
    with pytest.raises(ValueError, match="unknown model 'convnextv2_giant'; valid models: convnextv2_atto"):
        create_fcmae("convnextv2_giant")
    with pytest.raises(ValueError, match="unknown backend"):
        create_fcmae(TINY, backend="cuda")
    with pytest.raises(ValueError, match="grn_stats"):
        create_fcmae(TINY, grn_stats="channel")
    with pytest.raises(ValueError, match="mask ratio"):
        create_fcmae(TINY, mask_ratio=0.0)
    assert get_variant("atto").name == "convnextv2_atto"


def test_minkowski_backend_missing_names_install_step(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "MinkowskiEngine", None)  # makes `import MinkowskiEngine` fail
    model = create_fcmae(TINY, backend="dense", decoder_dim=64)
    with pytest.raises(ImportError, match="tools/setup.sh"):
        model.encoder.set_backend("minkowski")
        model(torch.randn(1, 3, 64, 64))


@pytest.mark.slow
def test_huge_builds_and_runs_a_step():
    model = create_fcmae("convnextv2_huge")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss, pred, _ = model(torch.randn(1, 3, 64, 64))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and pred.shape == (1, 3, 3072)
