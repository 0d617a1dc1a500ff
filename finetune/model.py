"""The fine-tuned network: timm's dense ConvNeXt V2, optionally initialised from an FCMAE (or other) checkpoint."""
import timm
import torch
from timm.layers import trunc_normal_

from fcmae.runtime.errors import CheckpointError
from fcmae.runtime.weights import checkpoint_errors
from models.convert import load_into_timm
from models.grn import use_float32_grn_stats

HEAD_INIT_SCALE = 0.001  # reference: head weights drawn with std 0.02, then scaled by 0.001 (std 2e-5)


def create_classifier(model_name: str, num_classes: int, drop_path: float, in_chans: int = 3) -> torch.nn.Module:
    # head_init_scale gives a from-scratch model the same small head as a fine-tuned one
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path,
                              head_init_scale=HEAD_INIT_SCALE, in_chans=in_chans)
    return use_float32_grn_stats(model)  # GRN norms in float32 under fp16/bf16 autocast


def reset_head(model: torch.nn.Module):
    """Trunc-normal std 2e-5, bias 0: near-zero logits, so the pretrained features are not disturbed early on."""
    trunc_normal_(model.head.fc.weight, std=0.02 * HEAD_INIT_SCALE)
    torch.nn.init.zeros_(model.head.fc.bias)


def init_from_pretrained(model: torch.nn.Module, state_dict: dict, keep_head: bool):
    """Strict about the encoder (every stem/stage tensor must be present and match). With keep_head the whole
    head comes from the checkpoint; otherwise only head.fc is re-initialised (std 2e-5) and a final norm the
    checkpoint has (head.norm: a fine-tuned or released classifier) is kept, as the reference does. A checkpoint
    without one (FCMAE pretraining: no final norm) leaves timm's (1, 0)."""
    with checkpoint_errors():
        load_into_timm(model, state_dict, keep_head=keep_head)
    if not keep_head:
        load_final_norm(model, state_dict)
        reset_head(model)


def load_final_norm(model: torch.nn.Module, state_dict: dict) -> bool:
    """Copy head.norm.weight / head.norm.bias from the checkpoint when it has them; True when it did."""
    keys = [f"head.norm.{p}" for p in ("weight", "bias")]
    present = [k for k in keys if k in state_dict]
    if not present:
        return False
    own = model.state_dict()
    if len(present) != len(keys):
        raise CheckpointError(f"checkpoint has {present[0]} but not {(set(keys) - set(present)).pop()}")
    bad = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in keys
           if state_dict[k].shape != own[k].shape]
    if bad:
        raise CheckpointError("checkpoint's final norm does not fit: " + "; ".join(bad))
    with torch.no_grad():
        model.head.norm.weight.copy_(state_dict["head.norm.weight"])
        model.head.norm.bias.copy_(state_dict["head.norm.bias"])
    return True


class LinearProbe(torch.nn.Module):
    """Linear probing of a timm ConvNeXt V2: the encoder (stem, stages) is frozen and always runs in eval mode
    (no drop-path); only the head learns (global average pool -> LayerNorm -> Linear, no BatchNorm). The
    features are computed without autograd, so a step costs an inference pass plus the head's backward.
    The wrapped model keeps its own names: its state dict is the whole classifier's."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # set here, not once: evaluating puts the whole model back in train mode afterwards
        for part in (self.model.stem, self.model.stages, self.model.norm_pre):
            part.eval()
        with torch.no_grad():
            features = self.model.forward_features(images)
        return self.model.forward_head(features)
