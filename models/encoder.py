"""The FCMAE encoder: timm's ConvNeXt V2 without its head, executed on visible patches by a backend."""
import timm
import torch
from torch import nn

from .backends import make_backend
from .grn import check_grn_stats
from .variants import get_variant


class SparseConvNeXtV2(nn.Module):
    """Owns `stem.*` and `stages.*` with exactly timm's names and shapes (its state dict is timm's minus
    `head.*`); `forward(imgs, mask)` returns (N, C4, H/32, W/32) with zeros at masked cells."""

    def __init__(self, model: str, backend: str = "sparse", grn_stats: str = "sample"):
        super().__init__()
        self.variant = get_variant(model)
        dense = timm.create_model(self.variant.timm_name, pretrained=False, num_classes=0)
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

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.backend(self, imgs, mask)

    def extra_repr(self) -> str:
        return f"backend={self.backend.name}, grn_stats={self.grn_stats}"
