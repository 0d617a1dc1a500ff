"""Weights from a checkpoint file in any layout the converter reads (models.convert: ours, timm, Hugging Face, the
reference code's), for the command-line tools: the file is read without running code (checkpoint_file) and a
conversion problem becomes the one-line CheckpointError the CLIs report."""
import contextlib
from typing import Dict, Optional, Tuple

import timm
import torch

from models.convert import ConversionError, in_chans_of, load_into_timm, to_timm

from .checkpoint_file import read_checkpoint
from .errors import CheckpointError


@contextlib.contextmanager
def checkpoint_errors():
    """Inside: models.convert's ConversionError is raised as CheckpointError (same message)."""
    try:
        yield
    except ConversionError as e:
        raise CheckpointError(str(e)) from None


def read_timm_weights(path: str, model_name: Optional[str] = None,
                      use_ema: bool = False) -> Tuple[str, Dict[str, torch.Tensor]]:
    """(variant name, timm state dict) of the checkpoint at `path` (models.convert.to_timm)."""
    with checkpoint_errors():
        return to_timm(read_checkpoint(path), model_name, use_ema)


def timm_encoder(path: str, model_name: Optional[str] = None, use_ema: bool = False):
    """(variant name, timm's ConvNeXt V2 without a classifier, in eval mode, its stem and stages loaded strictly
    from the checkpoint at `path`); the number of input channels is the checkpoint's."""
    name, weights = read_timm_weights(path, model_name, use_ema)
    with checkpoint_errors():
        model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans_of(weights))
        load_into_timm(model, weights, keep_head=False)
    return name, model.eval()
