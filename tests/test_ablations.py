"""The paper's ablations as model changes: naive masking (mask once after the stem, dense convolutions after)
and the GRN ablation (GRN as the identity, frozen)."""
import copy

import pytest
import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from models import create_fcmae, random_mask
from models.ablations import has_active_grn, remove_grn
from models.encoder import SparseConvNeXtV2
from tests.conftest import TINY, randomize_grn

pytestmark = pytest.mark.usefixtures("one_thread")


def encoder_pair():
    """The same randomly initialised encoder (GRN non-zero) on the naive and the dense (oracle) backend."""
    torch.manual_seed(0)
    naive = randomize_grn(SparseConvNeXtV2(TINY, backend="naive")).eval()
    dense = copy.deepcopy(naive)
    dense.set_backend("dense")
    return naive, dense


def test_naive_equals_dense_oracle_when_nothing_is_masked():
    naive, dense = encoder_pair()
    imgs = torch.randn(2, 3, 64, 96)
    visible = torch.zeros(2, 6)
    with torch.no_grad():
        out = naive(imgs, visible)
        assert out.shape == (2, 64, 2, 3)
        torch.testing.assert_close(out, dense(imgs, visible), rtol=1e-4, atol=1e-4)


def test_naive_leaks_through_masked_sites_with_a_real_mask():
    naive, dense = encoder_pair()
    imgs = torch.randn(2, 3, 96, 96)
    mask = random_mask(2, 9, 0.6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, oracle = naive(imgs, mask), dense(imgs, mask)
        masked = mask.view(2, 1, 3, 3).bool().expand_as(out)
        assert (out[masked] == 0).all()  # zeroed at masked cells, like every backend
        # at visible cells the naive encoder has seen the masked sites it filled in: not the sparse semantics
        assert (out - oracle)[~masked].abs().max() > 1e-2
        # but not the masked pixels themselves: the stem output is masked before anything mixes sites
        noisy = imgs.clone()
        pixel_mask = mask.view(2, 1, 3, 3).repeat_interleave(32, 2).repeat_interleave(32, 3).bool().expand_as(imgs)
        noisy[pixel_mask] = torch.randn(int(pixel_mask.sum()))
        torch.testing.assert_close(naive(noisy, mask), out)


def test_naive_backend_trains_every_encoder_parameter():
    torch.manual_seed(0)
    model = create_fcmae(TINY, backend="naive", decoder_dim=64)
    loss, _, _ = model(torch.randn(2, 3, 64, 64))
    loss.backward()
    assert all(p.grad is not None for n, p in model.encoder.named_parameters()), "a parameter got no gradient"


def test_grn_less_block_equals_the_block_without_grn():
    torch.manual_seed(0)
    encoder = randomize_grn(SparseConvNeXtV2(TINY)).eval()
    block = encoder.stages[1].blocks[0]
    without = copy.deepcopy(block)
    without.mlp.grn = nn.Identity()
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        assert (block(x) - without(x)).abs().max() > 1e-3  # the randomised GRN does act before the ablation
        remove_grn(encoder)
        torch.testing.assert_close(block(x), without(x), rtol=0, atol=0)
    assert not has_active_grn(encoder)


def test_removed_grn_stays_zero_through_optimiser_steps_and_keeps_its_keys():
    torch.manual_seed(0)
    model = create_fcmae(TINY)
    keys = list(model.state_dict())
    remove_grn(model.encoder)
    assert list(model.state_dict()) == keys  # checkpoints keep timm's layout
    frozen = [p for n, p in model.encoder.named_parameters() if ".grn." in n]
    assert len(frozen) == 2 * sum((1, 1, 2, 1)) and not any(p.requires_grad for p in frozen)
    # the pretraining CLI's optimiser: timm's groups (trainable parameters only), weight decay on matrices
    optimizers = [torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-2, betas=(0.9, 0.95)),
                  torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)]  # a careless one: no grad, no step
    decoder_grn = model.decoder[0].mlp.grn.weight
    for opt in optimizers:
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(2, 3, 64, 64))[0].backward()
            opt.step()
    assert all((p == 0).all() for p in frozen)
    assert decoder_grn.abs().sum() > 0  # the decoder's GRN is not ablated and learns
    # and the weights load into timm's dense ConvNeXt V2 strictly
    import timm

    dense = timm.create_model(TINY, num_classes=0)
    result = dense.load_state_dict({k[len("encoder."):]: v for k, v in model.state_dict().items()
                                    if k.startswith("encoder.")}, strict=False)
    assert not result.unexpected_keys and sorted(result.missing_keys) == ["head.norm.bias", "head.norm.weight"]


def test_remove_grn_refuses_a_model_without_grn():
    with pytest.raises(ValueError, match="no GRN"):
        remove_grn(nn.Linear(2, 2))
