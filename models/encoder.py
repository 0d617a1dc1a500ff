"""The FCMAE encoder: timm's ConvNeXt V2 without its head, executed on visible patches by a backend."""
from typing import Optional

import timm
import torch
from torch import nn

from . import test_variant  # noqa: F401  (timm can then build the test variant)
from .backends import make_backend
from .grn import check_grn_stats
from .variants import get_variant


class SparseConvNeXtV2(nn.Module):
    """Owns `stem.*` and `stages.*` with exactly timm's names and shapes (its state dict is timm's minus
    `head.*`); `forward(imgs, mask, keep=None)` returns (N, C4, H/32, W/32) with zeros at masked cells.
    `in_chans` is timm's: the stem takes that many image channels."""

    def __init__(self, model: str, backend: str = "sparse", grn_stats: str = "sample", in_chans: int = 3):
        super().__init__()
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        self.variant = get_variant(model)
        self.in_chans = in_chans
        dense = timm.create_model(self.variant.name, pretrained=False, num_classes=0, in_chans=in_chans)
        self.stem = dense.stem
        self.stages = dense.stages
        self.grn_stats = check_grn_stats(grn_stats)
        self.grad_checkpointing = False  # recompute each block in backward instead of storing its activations
        self.set_backend(backend)

    @property
    def num_features(self) -> int:
        return self.variant.dims[-1]

    def set_backend(self, name: str):
        self.backend = make_backend(name)  # a plain object, not a module: weights stay where they are

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor, keep: Optional[int] = None) -> torch.Tensor:
        """imgs (N, in_chans, H, W); mask (N, L) with 1 = masked. `keep`: the number of visible cells that every
        image keeps, when the caller guarantees it (FCMAE passes num_visible(L, mask_ratio)): the sparse backend
        then runs without host synchronisation and can be traced by torch.compile. Without it any mask works,
        including one with a different count per image (the sparse backend reads the counts on the host)."""
        return self.backend(self, imgs, mask, keep)

    def extra_repr(self) -> str:
        return f"backend={self.backend.name}, grn_stats={self.grn_stats}, in_chans={self.in_chans}"
