"""Fine-tuning from a checkpoint with a final norm keeps that norm (as the reference does); only head.fc is
re-initialised (std 2e-5, bias 0) unless keep_head."""
import pytest
import timm
import torch

from fcmae.runtime.errors import CheckpointError
from finetune.model import create_classifier, init_from_pretrained
from tests.conftest import TINY


def classifier_state(num_classes=10, seed=0):
    """A fine-tuned classifier's timm state dict, its final norm far from (1, 0)."""
    torch.manual_seed(seed)
    model = timm.create_model(TINY, num_classes=num_classes)
    with torch.no_grad():
        model.head.norm.weight.uniform_(0.5, 2.0)
        model.head.norm.bias.normal_()
        model.head.fc.weight.normal_()
    return model.state_dict()


def test_final_norm_kept_and_fc_reinitialised():
    state = classifier_state()
    model = create_classifier(TINY, num_classes=5, drop_path=0.0)  # another number of classes
    init_from_pretrained(model, state, keep_head=False)
    torch.testing.assert_close(model.head.norm.weight, state["head.norm.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.head.norm.bias, state["head.norm.bias"], rtol=0, atol=0)
    w = model.head.fc.weight
    assert w.shape == (5, 64) and 1e-5 < w.std() < 3e-5  # std 0.02 x head_init_scale 0.001
    assert (model.head.fc.bias == 0).all()
    torch.testing.assert_close(model.stages[3].blocks[0].mlp.grn.weight, state["stages.3.blocks.0.mlp.grn.weight"])


def test_pretraining_checkpoint_without_final_norm_gets_a_fresh_one():
    state = {k: v for k, v in classifier_state().items() if not k.startswith("head.")}
    model = create_classifier(TINY, num_classes=10, drop_path=0.0)
    init_from_pretrained(model, state, keep_head=False)
    assert (model.head.norm.weight == 1).all() and (model.head.norm.bias == 0).all()
    assert 0 < model.head.fc.weight.std() < 4e-5


def test_keep_head_takes_the_whole_head():
    state = classifier_state()
    model = create_classifier(TINY, num_classes=10, drop_path=0.0)
    init_from_pretrained(model, state, keep_head=True)
    for key in ("head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"):
        torch.testing.assert_close(model.state_dict()[key], state[key], rtol=0, atol=0)


def test_half_a_final_norm_is_an_error():
    state = classifier_state()
    del state["head.norm.bias"]
    model = create_classifier(TINY, num_classes=10, drop_path=0.0)
    with pytest.raises(CheckpointError, match="head.norm.bias"):
        init_from_pretrained(model, state, keep_head=False)
