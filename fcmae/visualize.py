"""Reconstruction pictures: rows of original | masked input | reconstruction (visible patches pasted back)."""
import torch

from models.masking import visible_map

from .data import IMAGENET_MEAN, IMAGENET_STD


def denormalize(imgs: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)
    return (imgs * std + mean).clamp(0, 1)


@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, mask: torch.Tensor = None):
    """(masked input, reconstruction) in the normalised image space of `imgs`. With norm_pix_loss the
    prediction is per-patch normalised, so it is mapped back with each patch's own mean and std."""
    loss, pred, mask = model(imgs, mask)
    n, c = pred.shape[:2]
    grid = (imgs.shape[2] // model.patch_size, imgs.shape[3] // model.patch_size)
    pred = pred.float().reshape(n, c, -1).transpose(1, 2)  # (N, L, p*p*3)
    target = model.patchify(imgs.float())
    if model.norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
        pred = pred * std + mean
    m = mask.float().unsqueeze(-1)
    masked = model.unpatchify(target * (1 - m), grid)
    recon = model.unpatchify(target * (1 - m) + pred * m, grid)
    return masked, recon, mask, loss


def reconstruction_grid(model, imgs: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
    """A (3, H_total, W_total) image in [0, 1]: one row per image, columns original | masked | reconstruction."""
    from torchvision.utils import make_grid

    was_training = model.training
    model.eval()
    try:
        masked, recon, mask, _ = reconstruct(model, imgs, mask)
    finally:
        model.train(was_training)
    masked_vis = denormalize(masked)
    grid = (imgs.shape[2] // model.patch_size, imgs.shape[3] // model.patch_size)
    hidden = visible_map(mask, grid, model.patch_size).eq(0).expand_as(masked_vis)
    masked_vis[hidden] = 0.5  # grey where masked
    triplets = torch.stack([denormalize(imgs.float()), masked_vis, denormalize(recon)], dim=1).flatten(0, 1)
    return make_grid(triplets.cpu(), nrow=3, padding=2, pad_value=1.0)
