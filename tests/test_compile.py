"""torch.compile of the training step (models.fcmae.compile_for_training): the sparse encoder and the decoder
with the loss compile with fullgraph=True, which proves static shapes and no host reads in forward and backward,
and give eager's loss and gradients."""
import copy

import torch

from models.fcmae import compile_for_training, create_fcmae
from models.masking import random_mask
from tests.conftest import TINY, randomize_grn


def test_compiled_sparse_step_equals_eager():
    torch.manual_seed(0)
    eager = randomize_grn(create_fcmae(TINY, backend="sparse", decoder_dim=64), std=0.1)
    compiled = compile_for_training(copy.deepcopy(eager), fullgraph=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # parameter names unchanged
    imgs, mask = torch.randn(2, 3, 64, 64), random_mask(2, 4, 0.6)
    results = []
    for model in (eager, compiled):
        loss, pred, _ = model(imgs, mask)
        loss.backward()
        results.append((loss.detach(), pred.detach(), {k: p.grad for k, p in model.named_parameters()}))
    (loss_e, pred_e, grads_e), (loss_c, pred_c, grads_c) = results
    assert torch.allclose(loss_c, loss_e, rtol=1e-5)
    assert torch.allclose(pred_c, pred_e, rtol=1e-4, atol=1e-5)
    for name, g in grads_e.items():
        assert grads_c[name] is not None, name
        assert (grads_c[name] - g).norm() <= 1e-4 * g.norm() + 1e-8, name
    # predict stays eager (the mask there may keep any count) and agrees with the compiled model's weights
    assert torch.allclose(compiled.predict(imgs, mask), eager.predict(imgs, mask), rtol=1e-5, atol=1e-6)
