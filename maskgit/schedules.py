"""Mask schedules m(t): the fraction of tokens masked at time t in [0, 1], with m(0) = 1 (all masked), m(1) = 0.

Training draws t ~ U(0, 1) and masks a fraction m(t) of the grid; sampling walks t from 0 to 1 and keeps
a fraction m(t) masked after each step. The same function serves both, so they cannot drift apart.

`mdlm_weight` is the continuous-time ELBO weight of masked diffusion (Sahoo et al. 2024, MDLM) in this time
convention: with alpha(t) = 1 - m(t) the probability that a token is revealed, the NELBO weight on the
cross-entropy of each masked token is alpha'(t) / (1 - alpha(t)) = -m'(t) / m(t) >= 0.
(x-transformers uses m'(t) / (1 - m(t)), which is negative for every decreasing m: see docs/upstream.md.)
"""

import math

import torch
from torch import Tensor

SCHEDULES = ("cosine", "linear", "square", "arccos")

# -m'/m diverges as t -> 1 (m -> 0); at least one token is always masked, so the weight there is not meaningful
# anyway. 100 is where the linear and cosine weights cross at t ~ 0.99.
MDLM_MAX_WEIGHT = 100.0


def check_schedule(name: str) -> None:
    """Raise ValueError unless `name` is a known schedule."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown mask schedule {name!r}: choose one of {SCHEDULES}")


def mask_rate(name: str, t: Tensor) -> Tensor:
    """m(t) in [0, 1] for t in [0, 1] (t is clamped to that range): decreasing from 1 to 0."""
    check_schedule(name)
    t = t.clamp(0.0, 1.0)
    if name == "cosine":
        m = torch.cos(t * (math.pi / 2))
    elif name == "linear":
        m = 1.0 - t
    elif name == "square":
        m = 1.0 - t * t
    else:  # arccos
        m = torch.arccos(t) * (2 / math.pi)
    return m.clamp(0.0, 1.0)  # float32 cos(pi/2) is -4e-8, not 0


def mask_rate_derivative(name: str, t: Tensor) -> Tensor:
    """dm/dt in closed form (<= 0; -inf for arccos at t = 1)."""
    check_schedule(name)
    t = t.clamp(0.0, 1.0)
    if name == "cosine":
        return -(math.pi / 2) * torch.sin(t * (math.pi / 2))
    if name == "linear":
        return torch.full_like(t, -1.0)
    if name == "square":
        return -2.0 * t
    return -(2 / math.pi) / torch.sqrt(1.0 - t * t)  # arccos


def mdlm_weight(name: str, t: Tensor, max_weight: float = MDLM_MAX_WEIGHT) -> Tensor:
    """MDLM loss weight -m'(t) / m(t) >= 0, clamped to `max_weight` where m(t) -> 0 (t -> 1)."""
    neg_slope = (-mask_rate_derivative(name, t)).clamp(min=0.0)
    m = mask_rate(name, t).clamp(min=torch.finfo(t.dtype).tiny)  # m = 0 gives inf, clamped below, never nan
    return (neg_slope / m).clamp(max=max_weight)
