"""FCMAE: sparse ConvNeXt V2 encoder + one-block ConvNeXt V2 decoder + masked, per-patch-normalised MSE."""
import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.convnext import ConvNeXtBlock
from torch import nn

from .backends.dwconv import use_cpu_depthwise_conv
from .encoder import SparseConvNeXtV2
from .grn import use_float32_grn_stats
from .masking import PATCH_SIZE, check_mask, mask_grid, num_visible, random_mask, split_cells


class FCMAE(nn.Module):
    """Images (N, C, H, W) with C = in_chans; the decoder predicts the 32*32*C pixel values of every patch.

    Training (`forward`) takes masks drawn by the reference rule (models.masking.random_mask): every image keeps
    exactly num_visible(L, mask_ratio) cells. That static count lets the whole step run without host
    synchronisation and with static shapes (torch.compile, see compile_for_training). A mask with another
    count is refused with a clear error; `predict` + `forward_loss` take any mask (visualisation, evaluation).
    """

    def __init__(self, model: str, backend: str = "sparse", grn_stats: str = "sample", mask_ratio: float = 0.6,
                 decoder_dim: int = 512, decoder_depth: int = 1, norm_pix_loss: bool = True, in_chans: int = 3):
        super().__init__()
        num_visible(49, mask_ratio)  # validates the ratio now, not at the first step
        if decoder_dim < 1 or decoder_depth < 1:
            raise ValueError(f"decoder_dim and decoder_depth must be >= 1, got {decoder_dim}, {decoder_depth}")
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = PATCH_SIZE
        self.in_chans = in_chans
        self.encoder = SparseConvNeXtV2(model, backend=backend, grn_stats=grn_stats, in_chans=in_chans)
        self.proj = nn.Conv2d(self.encoder.num_features, decoder_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
        self.decoder = nn.Sequential(*[
            ConvNeXtBlock(decoder_dim, use_grn=True, ls_init_value=None, conv_mlp=False) for _ in range(decoder_depth)
        ])
        self.pred = nn.Conv2d(decoder_dim, PATCH_SIZE ** 2 * in_chans, kernel_size=1)
        use_float32_grn_stats(self.decoder)
        use_cpu_depthwise_conv(self.decoder)
        self._init_decoder()

    def _init_decoder(self):
        # std 0.02 everywhere: the reference re-initialised its Conv2d layers with std 1.0, a cause of NaNs.
        for m in [self.proj, self.pred, *self.decoder.modules()]:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), pixel order (p, q, channel) as in the reference."""
        n, c, h, w = imgs.shape
        p = self.patch_size
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor, grid) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W)."""
        n, p = x.shape[0], self.patch_size
        c = x.shape[-1] // (p * p)
        x = x.reshape(n, grid[0], grid[1], p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, grid[0] * p, grid[1] * p)

    def check_images(self, imgs: torch.Tensor):
        """The mask grid (rows, cols) of images (N, in_chans, H, W); a ValueError for anything else."""
        if imgs.dim() != 4 or imgs.shape[1] != self.in_chans or imgs.shape[0] < 1:
            raise ValueError(f"expected images shaped (N>=1, {self.in_chans}, H, W) (the model's in_chans), "
                             f"got {tuple(imgs.shape)}")
        return mask_grid(imgs.shape[2], imgs.shape[3], self.patch_size)

    def decode(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder features (N, C4, h, w) -> the decoder block's output (N, D, h, w), dense on the grid, before
        the `pred` projection; masked cells enter as the mask token."""
        x = self.proj(feats)
        m = mask.reshape(x.shape[0], 1, x.shape[2], x.shape[3]).to(x.dtype)
        x = x * (1.0 - m) + self.mask_token.to(x.dtype) * m
        return self.decoder(x)

    def target(self, patches: torch.Tensor) -> torch.Tensor:
        """Patches (..., p*p*C) -> float32 (at least) target; with norm_pix_loss normalised per patch over all its
        p*p*C values (unbiased var, eps 1e-6)."""
        target = patches.to(torch.promote_types(patches.dtype, torch.float32))
        if self.norm_pix_loss:
            centred = target - target.mean(dim=-1, keepdim=True)
            # unbiased variance in two passes: torch.var's one-pass CPU kernel took 8 ms of a 0.5 s step
            var = centred.square().sum(dim=-1, keepdim=True) / (target.shape[-1] - 1)
            target = centred / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Loss of a full prediction map pred (N, p*p*C, h, w) (from `predict`) for any mask (N, L): the mean over
        masked patches of the per-patch MSE, in float32 so fp16/bf16 cannot overflow it. Equals forward's loss."""
        n, c = pred.shape[:2]
        pred = pred.to(torch.promote_types(pred.dtype, torch.float32)).reshape(n, c, -1).transpose(1, 2)
        loss = ((pred - self.target(self.patchify(imgs))) ** 2).mean(dim=-1)
        mask = mask.to(pred.dtype)
        return (loss * mask).sum() / mask.sum().clamp_min(1.0)

    def decoder_loss(self, imgs: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor, masked: torch.Tensor):
        """The decoder and the loss at the masked cells only: `masked` (N, M) holds each image's masked cell indices.
        The decoder block runs dense on the grid; the final 1x1 `pred` projection (D -> p*p*C, the largest
        decoder layer) runs on the M masked rows only, since the loss reads nothing else.
        Returns (loss, pred (N, M, p*p*C))."""
        x = self.decode(feats, mask)
        x = x.flatten(2).transpose(1, 2)  # (N, L, D)
        rows = torch.gather(x, 1, masked.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        pred = F.linear(rows, self.pred.weight.flatten(1), self.pred.bias)
        patches = self.patchify(imgs)
        target = self.target(torch.gather(patches, 1, masked.unsqueeze(-1).expand(-1, -1, patches.shape[-1])))
        # every image has M masked cells: the mean over all rows is the mean over masked patches
        loss = ((pred.to(target.dtype) - target) ** 2).mean()
        return loss, pred

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor = None):
        """imgs (N, C, H, W), C = in_chans, H and W multiples of 32; mask (N, L) with 1 = masked, drawn when None;
        a given mask must keep exactly num_visible(L, mask_ratio) cells (0) per image, checked on the device
        (CPU: a ValueError). Returns (loss, pred (N, M, p*p*C) at the M = L - num_visible masked cells of each
        image in increasing cell order, mask). Full prediction maps: `predict`."""
        grid = self.check_images(imgs)
        num_patches = grid[0] * grid[1]
        keep = num_visible(num_patches, self.mask_ratio)
        if mask is None:
            mask = random_mask(imgs.shape[0], num_patches, self.mask_ratio, device=imgs.device)
        else:
            mask = check_mask(mask.to(imgs.device), imgs.shape[0], num_patches, keep)
        feats = self.encoder(imgs, mask, keep)
        loss, pred = self.decoder_loss(imgs, feats, mask, split_cells(mask, keep)[1])
        return loss, pred, mask

    @torch.no_grad()
    def predict(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Full prediction maps (N, p*p*C, H/32, W/32) for any mask (N, L) (1 = masked; any count per image), for
        visualisation and evaluation; the loss of it is forward_loss(imgs, pred, mask). Eager (never the
        compiled training graphs), without gradients, and it may synchronise with the device."""
        grid = self.check_images(imgs)
        mask = check_mask(mask.to(imgs.device), imgs.shape[0], grid[0] * grid[1])
        feats = self.encoder.forward(imgs, mask)  # .forward: bypasses a compiled encoder (compile_for_training)
        return self.pred(self.decode(feats, mask))


def compile_for_training(model: FCMAE, fullgraph: bool = True) -> FCMAE:
    """torch.compile the training step's model parts in place: the encoder (sparse and dense backends; the
    MinkowskiEngine one cannot be traced) and the decoder with the loss (decoder_loss). Parameter names and the
    state dict are unchanged (Module.compile / a compiled bound method). fullgraph=True: the sparse and dense
    encoders have static shapes and no host reads on the FCMAE path. Call it after choosing the backend; pass the
    model itself, not a DDP wrapper. `predict` stays eager."""
    if model.encoder.backend.name != "minkowski":
        model.encoder.compile(fullgraph=fullgraph)
    model.decoder_loss = torch.compile(model.decoder_loss, fullgraph=fullgraph)
    return model


def create_fcmae(name: str, backend: str = "sparse", grn_stats: str = "sample", mask_ratio: float = 0.6,
                 decoder_dim: int = 512, decoder_depth: int = 1, norm_pix_loss: bool = True,
                 in_chans: int = 3) -> FCMAE:
    return FCMAE(name, backend=backend, grn_stats=grn_stats, mask_ratio=mask_ratio, decoder_dim=decoder_dim,
                 decoder_depth=decoder_depth, norm_pix_loss=norm_pix_loss, in_chans=in_chans)
