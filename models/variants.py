"""The eight ConvNeXt V2 variants, one registry (reference notes, 'Model family').

Every variant is built by timm (`convnextv2_<variant>`); this table only names them and records the
shapes we check checkpoints against, so no code ever sniffs defaults from a model's name.
"""
from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Variant:
    name: str
    depths: Tuple[int, int, int, int]
    dims: Tuple[int, int, int, int]  # the variant's name is also timm's model name


VARIANTS = {
    v.name: v
    for v in [
        Variant("convnextv2_atto", (2, 2, 6, 2), (40, 80, 160, 320)),
        Variant("convnextv2_femto", (2, 2, 6, 2), (48, 96, 192, 384)),
        Variant("convnextv2_pico", (2, 2, 6, 2), (64, 128, 256, 512)),
        Variant("convnextv2_nano", (2, 2, 8, 2), (80, 160, 320, 640)),
        Variant("convnextv2_tiny", (3, 3, 9, 3), (96, 192, 384, 768)),
        Variant("convnextv2_base", (3, 3, 27, 3), (128, 256, 512, 1024)),
        Variant("convnextv2_large", (3, 3, 27, 3), (192, 384, 768, 1536)),
        Variant("convnextv2_huge", (3, 3, 27, 3), (352, 704, 1408, 2816)),
    ]
}


def get_variant(name: str) -> Variant:
    """Look a variant up by `convnextv2_<v>` or bare `<v>`; a clear error lists the valid names."""
    key = name if name.startswith("convnextv2_") else f"convnextv2_{name}"
    if key not in VARIANTS:
        raise ValueError(f"unknown model '{name}'; valid models: {', '.join(VARIANTS)}")
    return VARIANTS[key]


def variant_from_dims(depths, dims) -> Variant:
    """Infer the variant from tensor shapes (used by checkpoint loaders)."""
    for v in VARIANTS.values():
        if tuple(depths) == v.depths and tuple(dims) == v.dims:
            return v
    raise ValueError(f"no ConvNeXt V2 variant has depths {tuple(depths)} and dims {tuple(dims)}")
