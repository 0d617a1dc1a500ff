"""ConvNeXt V2 FCMAE models: variant registry, sparse encoder with backends, FCMAE model."""
from .backends import BACKENDS
from .encoder import SparseConvNeXtV2
from .fcmae import FCMAE, create_fcmae
from .grn import GRN_STATS
from .masking import random_mask
from .variants import VARIANTS, get_variant

__all__ = ["BACKENDS", "FCMAE", "GRN_STATS", "SparseConvNeXtV2", "VARIANTS", "create_fcmae", "get_variant", "random_mask"]
