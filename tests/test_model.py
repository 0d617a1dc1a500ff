"""FCMAE model contract: timm names and shapes, masks, loss math, input validation."""
import numpy as np
import pytest
import timm
import torch

from models import VARIANTS, create_fcmae
from models.masking import mask_grid, num_visible, random_mask
from models.variants import get_variant


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


def test_decoder_layout():
    model = create_fcmae("convnextv2_atto")
    sd = model.state_dict()
    assert sd["proj.weight"].shape == (512, 320, 1, 1)
    assert sd["mask_token"].shape == (1, 512, 1, 1)
    assert sd["pred.weight"].shape == (3072, 512, 1, 1)
    assert sd["decoder.0.mlp.grn.weight"].shape == (2048,)
    assert len(model.decoder) == 1
    assert len(create_fcmae("convnextv2_atto", decoder_depth=2, decoder_dim=64).decoder) == 2


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


def test_loss_matches_hand_computation():
    """Per-patch normalised target (unbiased var, eps 1e-6), per-patch MSE, mean over masked patches only."""
    torch.manual_seed(0)
    model = create_fcmae("convnextv2_atto").double()
    imgs = torch.randn(2, 3, 64, 32, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    pred = torch.randn(2, 3072, 2, 1, dtype=torch.float64)
    x = imgs.numpy()
    expected, count = 0.0, 0
    for n in range(2):
        for cell in range(2):
            if mask[n, cell] == 0:
                continue
            patch = x[n, :, cell * 32:(cell + 1) * 32, :].transpose(1, 2, 0).reshape(-1)  # (p, q, c) order
            target = (patch - patch.mean()) / np.sqrt(patch.var(ddof=1) + 1e-6)
            expected += np.mean((pred[n, :, cell, 0].numpy() - target) ** 2)
            count += 1
    loss = model.forward_loss(imgs, pred, mask)
    assert loss.item() == pytest.approx(expected / count, rel=1e-12)


@pytest.mark.parametrize("size,batch", [((64, 96), 1), ((96, 64), 2)])
def test_forward_shapes_any_batch_and_nonsquare(size, batch):
    model = create_fcmae("convnextv2_atto")
    loss, pred, mask = model(torch.randn(batch, 3, *size))
    assert pred.shape == (batch, 3072, size[0] // 32, size[1] // 32)
    assert mask.shape == (batch, (size[0] // 32) * (size[1] // 32))
    assert torch.isfinite(loss)


def test_bad_inputs_are_clear_errors():
    model = create_fcmae("convnextv2_atto")
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
    with pytest.raises(ValueError, match="unknown model 'convnextv2_giant'; valid models: convnextv2_atto"):
        create_fcmae("convnextv2_giant")
    with pytest.raises(ValueError, match="unknown backend"):
        create_fcmae("convnextv2_atto", backend="cuda")
    with pytest.raises(ValueError, match="grn_stats"):
        create_fcmae("convnextv2_atto", grn_stats="channel")
    with pytest.raises(ValueError, match="mask ratio"):
        create_fcmae("convnextv2_atto", mask_ratio=0.0)
    assert get_variant("atto").name == "convnextv2_atto"


def test_minkowski_backend_missing_names_install_step(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "MinkowskiEngine", None)  # makes `import MinkowskiEngine` fail
    model = create_fcmae("convnextv2_atto", backend="dense")
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
    assert torch.isfinite(loss) and pred.shape == (1, 3072, 2, 2)
