"""Reconstruction pictures: rows of original | masked input | reconstruction (visible patches pasted back).

Any number of channels: 3 channels show as RGB; three chosen bands (`show_channels`) as false-colour RGB;
otherwise one greyscale panel (original | masked | reconstruction) per channel.
"""
from typing import Optional, Sequence

import torch

from fcmae.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from models.masking import random_mask, visible_map


def denormalize(imgs: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, C, H, W) normalised -> data units, with per-channel mean and std (C values each)."""
    c = imgs.shape[1]
    mean = torch.as_tensor(mean, dtype=imgs.dtype, device=imgs.device).view(1, c, 1, 1)
    std = torch.as_tensor(std, dtype=imgs.dtype, device=imgs.device).view(1, c, 1, 1)
    return imgs * std + mean


@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, mask: torch.Tensor = None):
    """(masked input, reconstruction, mask, loss) in the normalised image space of `imgs`, from the model's full
    prediction maps (FCMAE.predict). With norm_pix_loss the prediction is per-patch normalised (over all the
    patch's channels), so it is mapped back with each patch's own mean and std. mask None: drawn at the model's
    mask ratio."""
    grid = (imgs.shape[2] // model.patch_size, imgs.shape[3] // model.patch_size)
    if mask is None:
        mask = random_mask(imgs.shape[0], grid[0] * grid[1], model.mask_ratio, device=imgs.device)
    pred = model.predict(imgs, mask)
    loss = model.forward_loss(imgs, pred, mask)
    n, c = pred.shape[:2]
    pred = pred.float().reshape(n, c, -1).transpose(1, 2)  # (N, L, p*p*C)
    target = model.patchify(imgs.float())
    if model.norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
        pred = pred * std + mean
    m = mask.float().unsqueeze(-1)
    masked = model.unpatchify(target * (1 - m), grid)
    recon = model.unpatchify(target * (1 - m) + pred * m, grid)
    return masked, recon, mask, loss


def _stretch(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Each (image, channel) of x mapped by the min..max of the same plane of `ref` (the original) to 0..1."""
    lo = ref.amin(dim=(2, 3), keepdim=True)
    hi = ref.amax(dim=(2, 3), keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)


def reconstruction_grid(model, imgs: torch.Tensor, mask: torch.Tensor = None,
                        mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                        show_channels: Optional[Sequence[int]] = None) -> torch.Tensor:
    """A (3, H_total, W_total) image in [0, 1]: one row per image; columns original | masked | reconstruction.

    imgs (N, C, H, W) normalised with per-channel `mean` and `std` (C values each; default ImageNet's for C = 3,
    none (0 and 1) otherwise). C = 3 shows as RGB (denormalised, clipped to 0..1). `show_channels`, three channel
    indices, shows those bands as RGB; otherwise (C != 3) each channel is one greyscale triple of columns. Bands
    shown that way are stretched to their own min..max in the original image (per image), the same stretch for
    its three columns, so any data units display. Masked patches are grey (0.5) in the masked column."""
    from torchvision.utils import make_grid

    c = imgs.shape[1]
    if mean is None and std is None:
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else ((0.0,) * c, (1.0,) * c)
    if mean is None or std is None or len(mean) != c or len(std) != c:
        raise ValueError(f"mean and std need {c} values each (one per channel), got {mean} and {std}")
    if show_channels is not None:
        show_channels = [int(i) for i in show_channels]
        if len(show_channels) != 3 or not all(0 <= i < c for i in show_channels):
            raise ValueError(f"show_channels must be 3 channel indices in [0, {c}), got {show_channels}")
    was_training = model.training
    model.eval()
    try:
        masked, recon, mask, _ = reconstruct(model, imgs, mask)
    finally:
        model.train(was_training)
    orig, masked, recon = (denormalize(x.float(), mean, std) for x in (imgs, masked, recon))
    if show_channels is None and c == 3:
        columns = [x.clamp(0, 1) for x in (orig, masked, recon)]
    else:
        chans = show_channels if show_channels is not None else list(range(c))
        ref = orig[:, chans]
        columns = [_stretch(x[:, chans], ref) for x in (orig, masked, recon)]
    grid = (imgs.shape[2] // model.patch_size, imgs.shape[3] // model.patch_size)
    hidden = visible_map(mask, grid, model.patch_size).eq(0)  # (N, 1, H, W)
    columns[1] = columns[1].masked_fill(hidden, 0.5)  # grey where masked
    if show_channels is None and c != 3:
        # one greyscale triple per channel: (N, C, H, W) -> C panels of (N, 3, H, W)
        panels = [col[:, k:k + 1].expand(-1, 3, -1, -1) for k in range(c) for col in columns]
    else:
        panels = columns
    tiles = torch.stack(panels, dim=1).flatten(0, 1)
    return make_grid(tiles.cpu(), nrow=len(panels), padding=2, pad_value=1.0)
