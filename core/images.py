"""Pixels in and out: [-1, 1] tensors to uint8 and to PNG grids."""

import torch
import torchvision
from einops import rearrange
from torch import Tensor


def images_per_batch(image_size: int) -> int:
    """Images per no-grad forward batch (encoding, evaluation): 256 at 32 px, fewer for larger images, since
    activation memory grows with the area (16 at 128 px and above)."""
    return max(16, min(256, 256 * 32 * 32 // image_size**2))


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float (b, 3, H, W) -> uint8 (b, H, W, 3), rounded to nearest and clamped."""
    x = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return rearrange(x, "b c h w -> b h w c")


def save_image_grid(images: Tensor, path, nrow: int) -> None:
    """Save a [-1, 1] (b, 3, H, W) batch as one PNG grid, `nrow` images per row, 2 px black padding."""
    images = (images.detach().float().cpu() + 1) / 2
    torchvision.utils.save_image(images.clamp(0, 1), path, nrow=nrow, padding=2)
