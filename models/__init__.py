"""ConvNeXt V2 FCMAE models: variant registry, sparse encoder with backends, FCMAE model.

The names below load on first use (PEP 562): `import models.variants` (the light registry the options and
--help read) does not import torch through this file.
"""
import importlib

_SOURCES = {"BACKENDS": ".backends", "FCMAE": ".fcmae", "create_fcmae": ".fcmae", "GRN_STATS": ".choices",
            "SparseConvNeXtV2": ".encoder", "random_mask": ".masking", "VARIANTS": ".variants",
            "get_variant": ".variants"}

__all__ = ["BACKENDS", "FCMAE", "GRN_STATS", "SparseConvNeXtV2", "VARIANTS", "create_fcmae", "get_variant", "random_mask"]


def __getattr__(name):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name], __name__), name)
    globals()[name] = value
    return value
