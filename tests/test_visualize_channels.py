"""Reconstruction grids for any number of channels (fcmae.pretrain.visualize): RGB, chosen bands, one grey panel per band."""
import pytest
import torch

from fcmae.pretrain.visualize import reconstruct, reconstruction_grid
from models import create_fcmae
from models.masking import random_mask
from tests.conftest import TINY

S = 64  # image side; make_grid puts 2 px of padding around every tile


def tile(grid, row, col):
    return grid[:, 2 + row * (S + 2):2 + row * (S + 2) + S, 2 + col * (S + 2):2 + col * (S + 2) + S]


def setup(in_chans, scale=1.0):
    torch.manual_seed(in_chans)
    model = create_fcmae(TINY, decoder_dim=64, in_chans=in_chans)
    imgs = torch.randn(2, in_chans, S, S) * scale
    return model, imgs, random_mask(2, 4, 0.6)


def test_rgb_grid_matches_denormalised_images():
    model, imgs, mask = setup(3)
    grid = reconstruction_grid(model, imgs, mask)
    assert grid.shape == (3, 2 + 2 * (S + 2), 2 + 3 * (S + 2))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (imgs[1] * std.view(3, 1, 1) + mean.view(3, 1, 1)).clamp(0, 1)
    assert torch.allclose(tile(grid, 1, 0), expected, atol=1e-6)
    masked = tile(grid, 1, 1)
    cell = int(mask[1].nonzero()[0])  # a masked cell: grey in the masked column
    r, c = divmod(cell, 2)
    assert torch.all(masked[:, r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] == 0.5)
    visible = int((mask[1] == 0).nonzero()[0])  # a visible cell: pasted back unchanged in the reconstruction
    r, c = divmod(visible, 2)
    window = (slice(None), slice(r * 32, (r + 1) * 32), slice(c * 32, (c + 1) * 32))
    assert torch.allclose(tile(grid, 1, 2)[window], expected[window], atol=1e-6)


@pytest.mark.parametrize("in_chans", [1, 4])
def test_one_grey_panel_per_channel_stretched(in_chans):
    model, imgs, mask = setup(in_chans, scale=1000.0)  # data units far outside 0..1
    grid = reconstruction_grid(model, imgs, mask, mean=[5.0] * in_chans, std=[2.0] * in_chans)
    assert grid.shape == (3, 2 + 2 * (S + 2), 2 + 3 * in_chans * (S + 2))
    for k in range(in_chans):
        orig = tile(grid, 0, 3 * k)
        assert torch.equal(orig[0], orig[1]) and torch.equal(orig[0], orig[2])  # grey
        band = imgs[0, k]
        expected = (band - band.min()) / (band.max() - band.min())  # its own min..max, whatever mean/std
        assert torch.allclose(orig[0], expected, atol=1e-5)


def test_chosen_bands_as_rgb():
    model, imgs, mask = setup(4)
    grid = reconstruction_grid(model, imgs, mask, show_channels=[3, 0, 1])
    assert grid.shape == (3, 2 + 2 * (S + 2), 2 + 3 * (S + 2))
    for rgb, band in enumerate([3, 0, 1]):
        x = imgs[0, band]
        assert torch.allclose(tile(grid, 0, 0)[rgb], (x - x.min()) / (x.max() - x.min()), atol=1e-5)


def test_reconstruct_uses_full_maps_for_any_mask():
    """A mask with a different count per image (not the training rule) still reconstructs; its loss is the
    full-map loss."""
    model, imgs, _ = setup(4)
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    masked, recon, out_mask, loss = reconstruct(model, imgs, mask)
    assert masked.shape == recon.shape == imgs.shape and torch.equal(out_mask, mask)
    assert torch.allclose(recon[0, :, :32, 32:], imgs[0, :, :32, 32:])  # cell 1 is visible: pasted back
    assert torch.isfinite(loss)


def test_bad_display_arguments():
    model, imgs, mask = setup(4)
    with pytest.raises(ValueError, match="show_channels must be 3 channel indices"):
        reconstruction_grid(model, imgs, mask, show_channels=[0, 1])
    with pytest.raises(ValueError, match="show_channels"):
        reconstruction_grid(model, imgs, mask, show_channels=[0, 1, 4])
    with pytest.raises(ValueError, match="4 values each"):
        reconstruction_grid(model, imgs, mask, mean=[0.5] * 3, std=[0.2] * 3)
