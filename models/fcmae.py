"""FCMAE: sparse ConvNeXt V2 encoder + one-block ConvNeXt V2 decoder + masked, per-patch-normalised MSE."""
import torch
from timm.layers import trunc_normal_
from timm.models.convnext import ConvNeXtBlock
from torch import nn

from .encoder import SparseConvNeXtV2
from .grn import use_float32_grn_stats
from .masking import PATCH_SIZE, check_mask, mask_grid, num_visible, random_mask


class FCMAE(nn.Module):
    def __init__(self, model: str, backend: str = "sparse", grn_stats: str = "sample", mask_ratio: float = 0.6,
                 decoder_dim: int = 512, decoder_depth: int = 1, norm_pix_loss: bool = True):
        super().__init__()
        num_visible(49, mask_ratio)  # validates the ratio now, not at the first step
        if decoder_dim < 1 or decoder_depth < 1:
            raise ValueError(f"decoder_dim and decoder_depth must be >= 1, got {decoder_dim}, {decoder_depth}")
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = PATCH_SIZE
        self.encoder = SparseConvNeXtV2(model, backend=backend, grn_stats=grn_stats)
        self.proj = nn.Conv2d(self.encoder.num_features, decoder_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
        self.decoder = nn.Sequential(*[
            ConvNeXtBlock(decoder_dim, use_grn=True, ls_init_value=None, conv_mlp=False) for _ in range(decoder_depth)
        ])
        self.pred = nn.Conv2d(decoder_dim, PATCH_SIZE ** 2 * 3, kernel_size=1)
        use_float32_grn_stats(self.decoder)
        self._init_decoder()

    def _init_decoder(self):
        # std 0.02 everywhere: the reference re-initialised its Conv2d layers with std 1.0, a cause of NaNs.
        for m in [self.proj, self.pred, *self.decoder.modules()]:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, L, p*p*3), pixel order (p, q, channel) as in the reference."""
        n, c, h, w = imgs.shape
        p = self.patch_size
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor, grid) -> torch.Tensor:
        """(N, L, p*p*3) -> (N, 3, H, W)."""
        n, p = x.shape[0], self.patch_size
        x = x.reshape(n, grid[0], grid[1], p, p, 3)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, 3, grid[0] * p, grid[1] * p)

    def forward_decoder(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.proj(feats)
        m = mask.reshape(x.shape[0], 1, x.shape[2], x.shape[3]).to(x.dtype)
        x = x * (1.0 - m) + self.mask_token.to(x.dtype) * m
        return self.pred(self.decoder(x))

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*3) float32 target; per-patch normalised (unbiased var, eps 1e-6) with norm_pix_loss."""
        target = self.patchify(imgs.to(torch.promote_types(imgs.dtype, torch.float32)))
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over masked patches of the per-patch MSE; computed in float32 so fp16/bf16 cannot overflow it."""
        n, c = pred.shape[:2]
        pred = pred.to(torch.promote_types(pred.dtype, torch.float32)).reshape(n, c, -1).transpose(1, 2)
        loss = ((pred - self.target(imgs)) ** 2).mean(dim=-1)
        mask = mask.to(pred.dtype)
        return (loss * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor = None):
        """imgs (N, 3, H, W), H and W multiples of 32; mask (N, L) with 1 = masked, drawn when None.
        Returns (loss, pred (N, 32*32*3, H/32, W/32), mask)."""
        if imgs.dim() != 4 or imgs.shape[1] != 3 or imgs.shape[0] < 1:
            raise ValueError(f"expected images shaped (N>=1, 3, H, W), got {tuple(imgs.shape)}")
        grid = mask_grid(imgs.shape[2], imgs.shape[3], self.patch_size)
        num_patches = grid[0] * grid[1]
        if mask is None:
            mask = random_mask(imgs.shape[0], num_patches, self.mask_ratio, device=imgs.device)
        else:
            mask = check_mask(mask.to(imgs.device), imgs.shape[0], num_patches)
        feats = self.encoder(imgs, mask)
        pred = self.forward_decoder(feats, mask)
        return self.forward_loss(imgs, pred, mask), pred, mask


def create_fcmae(name: str, backend: str = "sparse", grn_stats: str = "sample", mask_ratio: float = 0.6,
                 decoder_dim: int = 512, decoder_depth: int = 1, norm_pix_loss: bool = True) -> FCMAE:
    return FCMAE(name, backend=backend, grn_stats=grn_stats, mask_ratio=mask_ratio, decoder_dim=decoder_dim,
                 decoder_depth=decoder_depth, norm_pix_loss=norm_pix_loss)
