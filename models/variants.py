"""The eight ConvNeXt V2 variants, one registry (reference notes, 'Model family'), plus a tiny one for tests.

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
    test_only: bool = False  # not a model for users: left out of the names offered to them


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
        # For the test suite only, in the manner of timm's test_convnext: atto's architecture (GRN, 4C MLP as 1x1
        # convs, no layer scale) at a fraction of its cost, for tests that do not need a real variant's shapes.
        # Stage 2 keeps two blocks, so a stage still chains blocks. timm builds it once models.test_variant is
        # imported (models.encoder imports it: every model and checkpoint conversion goes through there).
        Variant("convnextv2_test", (1, 1, 2, 1), (24, 32, 48, 64), test_only=True),
    ]
}
USER_VARIANTS = [name for name, v in VARIANTS.items() if not v.test_only]


def get_variant(name: str) -> Variant:
    """Look a variant up by `convnextv2_<v>` or bare `<v>`; a clear error lists the valid names."""
    key = name if name.startswith("convnextv2_") else f"convnextv2_{name}"
    if key not in VARIANTS:
        raise ValueError(f"unknown model '{name}'; valid models: {', '.join(USER_VARIANTS)}")
    return VARIANTS[key]


def variant_from_dims(depths, dims) -> Variant:
    """Infer the variant from tensor shapes (used by checkpoint loaders)."""
    for v in VARIANTS.values():
        if tuple(depths) == v.depths and tuple(dims) == v.dims:
            return v
    raise ValueError(f"no ConvNeXt V2 variant has depths {tuple(depths)} and dims {tuple(dims)}")
