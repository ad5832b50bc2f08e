"""Halton reveal order for a token grid.

Besnier et al. 2025, "Halton scheduler for masked generative image transformers": revealing places in the order
of a 2D low-discrepancy sequence spreads each step's tokens over the image, so tokens decided together are far
apart and depend on each other less than neighbours do.
"""

from functools import lru_cache

import torch
from torch import Tensor


def radical_inverse(i: int, base: int) -> tuple[int, int]:
    """Digits of i in `base`, mirrored about the radix point, as an exact fraction (numerator, denominator)."""
    num, den = 0, 1
    while i > 0:
        i, digit = divmod(i, base)
        num, den = num * base + digit, den * base
    return num, den


@lru_cache(maxsize=32)
def _halton_order(h: int, w: int) -> tuple[int, ...]:
    seen: dict[int, None] = {}  # insertion-ordered set of flat cell indices
    i = 1  # the Halton point of index 0 is the corner (0, 0); the sequence proper starts at 1
    while len(seen) < h * w:
        rn, rd = radical_inverse(i, 2)
        cn, cd = radical_inverse(i, 3)
        # exact integer floor(r * size): float radical inverses can land a hair below a cell border
        seen.setdefault((rn * h // rd) * w + cn * w // cd, None)
        i += 1
    return tuple(seen)


def halton_order(h: int, w: int) -> Tensor:
    """Row-major cell indices (h*w,) in the order the 2D Halton sequence (bases 2 -> rows, 3 -> columns) hits them."""
    return torch.tensor(_halton_order(h, w), dtype=torch.long)
