"""timm's entry point for the test variant (models/variants.py, convnextv2_test), built as timm builds atto.

Its own module because registering needs timm, which models.variants must not import (--help reads the registry
before torch loads). models.encoder imports it, so any code that builds an FCMAE, converts a checkpoint or
fine-tunes (finetune.model and fcmae.runtime.weights import models.convert) can also build the test variant.
"""
from timm.models import PretrainedCfg, register_model
from timm.models.convnext import ConvNeXt, _create_convnext

from .variants import VARIANTS

# timm's settings for a model without released weights (none of its cfg fields is read by this project)
_CFG = PretrainedCfg(architecture="convnextv2_test", first_conv="stem.0", classifier="head.fc")


@register_model
def convnextv2_test(pretrained=False, **kwargs) -> ConvNeXt:
    """atto's model arguments with the test variant's depths and dims; timm's keyword arguments pass through."""
    v = VARIANTS["convnextv2_test"]
    kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or _CFG  # timm warns when a model has none
    model_args = dict(depths=v.depths, dims=v.dims, use_grn=True, ls_init_value=None, conv_mlp=True)
    return _create_convnext(v.name, pretrained=pretrained, **dict(model_args, **kwargs))
