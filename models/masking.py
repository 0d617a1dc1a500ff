"""Patch masks. Convention everywhere: mask is (N, L) with 1 = masked (removed), 0 = visible (kept)."""
from typing import Optional

import torch

PATCH_SIZE = 32  # = the encoder's total stride: one mask cell per final-stage feature


def mask_grid(height: int, width: int, patch_size: int = PATCH_SIZE):
    """(rows, cols) of the mask grid for an image; a clear error for sizes the encoder cannot tile."""
    if height % patch_size or width % patch_size or height <= 0 or width <= 0:
        raise ValueError(
            f"input size {height}x{width} is not divisible by the patch size {patch_size}; "
            f"use a height and width that are multiples of {patch_size} (e.g. 224)"
        )
    return height // patch_size, width // patch_size


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Visible cells per image: the reference keeps int(L * (1 - ratio)) (19 of 49 at 224, ratio 0.6)."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {mask_ratio}")
    keep = int(num_patches * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(
            f"mask ratio {mask_ratio} leaves no visible patch of {num_patches}; use a larger input or a smaller ratio"
        )
    return keep


def random_mask(batch: int, num_patches: int, mask_ratio: float, device=None, generator=None) -> torch.Tensor:
    """Per image, mask all but `num_visible` cells chosen uniformly at random (argsort of noise)."""
    keep = num_visible(num_patches, mask_ratio)
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask.scatter_(1, ids_shuffle[:, :keep], 0.0)
    return mask


def check_mask(mask: torch.Tensor, batch: int, num_patches: int, keep: Optional[int] = None) -> torch.Tensor:
    """Validate a given mask (N, L): its shape on the host (static), its values (only 0 and 1) and, with `keep`,
    its count (exactly `keep` visible cells in every image) without a host synchronisation on accelerators:
    there the value checks run on the device (torch._assert_async; a bad mask fails the step with a device-side
    assertion). On CPU, where reading values costs no synchronisation, they raise a ValueError at once."""
    if mask.shape != (batch, num_patches):
        raise ValueError(f"mask must have shape (N, L) = ({batch}, {num_patches}), got {tuple(mask.shape)}")
    binary_msg = "mask must hold only 0 (visible) and 1 (masked)"
    count_msg = (f"mask must keep exactly {keep} visible cells (0) in every image, the rule of the model's mask "
                 f"ratio (models.masking.random_mask); use FCMAE.predict / forward_loss for other masks")
    binary = ((mask == 0) | (mask == 1)).all()
    count = None if keep is None else ((mask == 0).sum(1) == keep).all()
    if mask.device.type == "cpu" and not torch.compiler.is_compiling():
        if not binary:
            raise ValueError(binary_msg)
        if count is not None and not count:
            raise ValueError(count_msg)
    else:
        torch._assert_async(binary, binary_msg)
        if count is not None:
            torch._assert_async(count, count_msg)
    return mask


def split_cells(mask: torch.Tensor, keep: int):
    """(visible, masked) cell indices, (N, keep) and (N, L - keep), each in increasing cell order (row-major),
    for a mask with exactly `keep` visible cells per image. A stable sort of the mask puts the zeros first in
    their original order: static shapes, no host synchronisation (unlike nonzero)."""
    order = torch.sort(mask.to(torch.float32), dim=1, stable=True).indices
    return order[:, :keep], order[:, keep:]


def visible_map(mask: torch.Tensor, grid, scale: int) -> torch.Tensor:
    """(N, 1, rows*scale, cols*scale) float map, 1 at visible sites: the mask upsampled by repetition."""
    n = mask.shape[0]
    vis = (1.0 - mask.float()).reshape(n, 1, grid[0], grid[1])
    return vis.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
