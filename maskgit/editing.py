"""Regions to regenerate, from pixels to tokens: a box or a mask image becomes the `keep` mask of `sample()`.

A token stands for an f x f cell of pixels (f = image side / grid side). A token is regenerated when its cell
overlaps the region at all, so that no pixel of the region is left to the original codes; every other token is
kept. `invert` swaps the two (outpainting: keep the region, regenerate around it).
"""

import torch
from einops import reduce, repeat
from torch import Tensor


def box_mask(box: tuple[int, int, int, int], height: int, width: int) -> Tensor:
    """(H, W) bool, True inside the pixel box (x0, y0, x1, y1) with x1, y1 exclusive; checks it lies inside."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {x0},{y0},{x1},{y1} must be non-empty and lie within the {width}x{height} image: "
                         f"need 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} (x1, y1 exclusive)")
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def image_mask(pixels: Tensor) -> Tensor:
    """(H, W) bool from a mask picture (H, W) or (H, W, C) of any numeric type: True where any channel is non-zero."""
    pixels = torch.as_tensor(pixels)
    return pixels != 0 if pixels.dim() == 2 else (pixels != 0).any(-1)


def token_mask(pixel_mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """(..., H, W) bool pixels -> (..., h, w) bool tokens: True where the token's cell holds any True pixel."""
    height, width = pixel_mask.shape[-2:]
    h, w = grid
    if height % h or width % w or height // h != width // w:
        raise ValueError(f"a {width}x{height} mask does not split into the {w}x{h} token grid's square cells")
    return reduce(pixel_mask.bool(), "... (h fh) (w fw) -> ... h w", "max", h=h, w=w)


def cell_pixels(tokens: Tensor, factor: int) -> Tensor:
    """(..., h, w) per-token values -> (..., h*f, w*f): each token's value spread over its f x f cell."""
    return repeat(tokens, "... h w -> ... (h fh) (w fw)", fh=factor, fw=factor)


def keep_mask(regenerate: Tensor, invert: bool = False) -> Tensor:
    """(..., h, w) bool tokens to regenerate -> (..., h*w) bool tokens to keep, row-major like the code sequence."""
    keep = regenerate if invert else ~regenerate
    return keep.flatten(-2)
