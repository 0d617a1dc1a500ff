"""Mixed precision on CPU: bf16/fp16 pretraining and fine-tuning steps give finite losses close to float32, and GRN
takes its norms in float32 where timm's overflows in fp16."""
import math

import pytest
import torch
from timm.layers.grn import GlobalResponseNorm

from fcmae.pretrain.cli import main as pretrain_main
from finetune.cli import run as finetune_run
from models import create_fcmae
from models.grn import Float32StatsGRN
from models.masking import random_mask
from tests.conftest import HAS_MINKOWSKI, TINY, TINY_PRETRAIN, randomize_grn


def test_grn_norms_do_not_overflow_in_fp16():
    """A 128x128 map of 1000s: the channel norm is 128000 > fp16's 65504."""
    x = torch.full((1, 128, 128, 4), 1000.0)
    timm_grn, ours = GlobalResponseNorm(4), Float32StatsGRN(4)
    for m in (timm_grn, ours):
        torch.nn.init.constant_(m.weight, 0.5)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not torch.isfinite(timm_grn(x.half())).all()  # what the reference's fp16 fine-tuning ran into
        out = ours(x.half())
    assert torch.isfinite(out).all()
    assert torch.allclose(out.float(), ours(x), rtol=1e-3)  # N = 1 for equal channels: 1000 * 1.5


@pytest.mark.parametrize("backend", ["sparse", "dense", pytest.param("minkowski", marks=pytest.mark.skipif(
    not HAS_MINKOWSKI, reason="MinkowskiEngine not installed"))])
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_forward_backward_close_to_float32(backend, amp):
    torch.manual_seed(0)
    model = randomize_grn(create_fcmae(TINY, backend=backend, decoder_dim=64), std=0.1)
    imgs, mask = torch.randn(2, 3, 64, 96), random_mask(2, 6, 0.6)
    loss32, _, _ = model(imgs, mask)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    with torch.autocast("cpu", dtype=dtype):
        loss, pred, _ = model(imgs, mask)
    assert pred.dtype == dtype and loss.dtype == torch.float32  # the loss is computed in float32
    loss.backward()
    assert math.isfinite(loss.item()) and abs(loss.item() - loss32.item()) < 0.05 * loss32.item()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_pretrain_and_finetune_steps_under_autocast(tmp_path, amp):
    done = pretrain_main(TINY_PRETRAIN + ["--input-size", "64", "--batch-size", "4", "--max-steps", "2",
                                          "--warmup-epochs", "0", "--num-workers", "0", "--amp", amp,
                                          "--knn-every-epochs", "0", "--output-dir", str(tmp_path / "pre")])
    assert done["steps"] == 2 and math.isfinite(done["first_loss"]) and math.isfinite(done["last_loss"])
    result = finetune_run(["--model", TINY, "--input-size", "32", "--batch-size", "8",
                           "--train-subset", "16", "--val-subset", "16", "--epochs", "1", "--num-workers", "0",
                           "--amp", amp, "--finetune", str(tmp_path / "pre" / "checkpoint-00000002.pth"),
                           "--output-dir", str(tmp_path / "ft")])
    assert result["steps"] == 2 and math.isfinite(result["first_loss"]) and math.isfinite(result["last_loss"])
    assert 0 <= result["acc1"] <= 100


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grn_gradient_is_finite_where_a_channel_is_all_zero(dtype):
    """GELU zeroes a channel at every site (pre-activations below about -14): its norm is 0. The gradient must stay
    finite there, as vector_norm's (a plain sqrt of the sum of squares gave NaN: 0 * inf), in the decoder's and the
    fine-tuning model's GRN (autograd) and in the sparse backend's (a hand-written backward)."""
    from models.backends.sparse import _GroupedGRN

    torch.manual_seed(0)
    x = torch.randn(2, 3, 3, 4)
    x[0, ..., 1] = 0.0  # image 0, channel 1: zero everywhere
    grn = Float32StatsGRN(4)
    torch.nn.init.normal_(grn.weight)
    torch.nn.init.normal_(grn.bias)
    for fn, inp in ((grn, x), (lambda t: _GroupedGRN.apply(t, grn.weight, grn.bias), x.reshape(2, 9, 4))):
        inp = inp.to(dtype).requires_grad_()
        grn.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            fn(inp).float().square().sum().backward()
        assert torch.isfinite(inp.grad).all() and torch.isfinite(grn.weight.grad).all()
