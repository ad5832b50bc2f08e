"""Adversarial building blocks for a VQGAN-style tokenizer loss: tensors in, tensors out, no file I/O.

* `PatchDiscriminator`: the pix2pix / taming "NLayer" PatchGAN, giving a grid of real/fake logits.
* Discriminator losses `hinge_d_loss`, `nonsaturating_d_loss` and generator losses `hinge_g_loss`,
  `nonsaturating_g_loss`; each returns a 0-dim tensor.
* `adaptive_weight`: taming's gradient-norm balance of the GAN term against the reconstruction term.
* Discriminator regularisers: `lecam_loss` with its `LeCAMEMA` state, and `r1_penalty`.

Formulas, sign and scale conventions, and what published tokenizers use: docs/gan_losses.md.
"""

from math import gcd

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

__all__ = [
    "PatchDiscriminator",
    "hinge_d_loss",
    "nonsaturating_d_loss",
    "hinge_g_loss",
    "nonsaturating_g_loss",
    "adaptive_weight",
    "lecam_loss",
    "LeCAMEMA",
    "r1_penalty",
]

NORMS = ("batch", "group", "none")


class _SamePadConv2d(nn.Conv2d):
    """Stride-1 4x4 conv that keeps the spatial size: pads 1 before and 2 after each spatial dim (TF "SAME").

    taming pads 1 on both sides here, which trims 1 px per conv (30x30 logits at 256 px, 0x0 at 16 px). Same
    parameters, same receptive field; only the border handling differs.
    """

    def forward(self, x):
        return super().forward(F.pad(x, (1, 2, 1, 2)))


class PatchDiscriminator(nn.Module):
    """pix2pix / taming NLayer PatchGAN: images (b, C, H, W) -> logits (b, 1, H / 2**L, W / 2**L), L = num_layers.

    Layers (widths w_i = channels * min(2**i, 8)):
      conv 4x4 stride 2 (C -> w_0), LeakyReLU(0.2)                        -- no normalisation on the first conv
      for i in 1..L-1: conv 4x4 stride 2 (w_{i-1} -> w_i), norm, LeakyReLU(0.2)
      conv 4x4 stride 1 (w_{L-1} -> w_L), norm, LeakyReLU(0.2)
      conv 4x4 stride 1 (w_L -> 1)                                        -- the logits
    So L stride-2 convs in all, as in taming's `NLayerDiscriminator(n_layers=L)` (same parameter shapes and order,
    under `self.main`). Difference: the two stride-1 convs are padded to keep the spatial size, so the logit grid is
    exactly (floor-halved L times) H x W, i.e. 32x32 at 256 px and 2x2 at 16 px, never below 1x1 for valid inputs
    (taming's padding gives 30x30 at 256 px and an empty map at 16 px).

    Receptive field of one logit: `receptive_field(L)` = 16, 34, 70, 142 px for L = 1, 2, 3, 4 (the classic
    "70x70 PatchGAN" at L=3). Minimum input side: `min_input_size(L)` = 2**L px (8 px for L=3: a 1x1 logit map);
    smaller inputs raise ValueError. Usable range for L=3: 16 px (2x2 logits) .. 256 px (32x32) and beyond.

    Args:
        in_channels: image channels.
        channels: width of the first conv (taming's `ndf`, 64).
        num_layers: number of stride-2 convs L (taming's `n_layers`, 3).
        norm: "group" (default; GroupNorm, up to 32 groups of >= 4 channels), "batch" (taming's choice; in
            training it needs more than one value per channel: batch > 1 or a logit map above 1x1) or "none".
            Why not BatchNorm by default: its statistics are per process and per forward call. With small
            per-GPU batches the statistics are noisy; real and fake batches, passed separately, are normalised
            with different statistics, so the discriminator can tell them apart from batch statistics instead of
            from the images; under DDP the running-stat buffers are per rank (or broadcast from rank 0 every
            forward, which is at odds with the two forwards per step a GAN needs) unless converted to
            SyncBatchNorm; and a gradient penalty (R1) assumes each logit depends on its own image only.
            GroupNorm has none of these problems and works with a batch of one.
        spectral_norm: wrap every conv in `torch.nn.utils.parametrizations.spectral_norm`.

    Init as taming: conv weights N(0, 0.02), norm scales N(1, 0.02), norm shifts and conv biases 0.
    Convs before a norm layer have no bias (the norm's shift replaces it); with norm="none" all convs have one.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3, norm: str = "group",
                 spectral_norm: bool = False):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if channels < 1 or in_channels < 1:
            raise ValueError(f"channels and in_channels must be >= 1, got {channels} and {in_channels}")
        self.in_channels, self.num_layers, self.norm = in_channels, num_layers, norm
        use_bias = norm == "none"
        widths = [channels * min(2**i, 8) for i in range(num_layers + 1)]

        layers = [nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for i in range(1, num_layers):
            layers += [nn.Conv2d(widths[i - 1], widths[i], 4, stride=2, padding=1, bias=use_bias),
                       *self._norm(widths[i]), nn.LeakyReLU(0.2)]
        layers += [_SamePadConv2d(widths[-2], widths[-1], 4, stride=1, bias=use_bias), *self._norm(widths[-1]),
                   nn.LeakyReLU(0.2)]
        layers += [_SamePadConv2d(widths[-1], 1, 4, stride=1)]
        self.main = nn.Sequential(*layers)

        self.apply(_init_weights)
        if spectral_norm:  # after init: the parametrization starts from the initialised weights
            for i, layer in enumerate(self.main):
                if isinstance(layer, nn.Conv2d):
                    self.main[i] = _spectral_norm(layer)

    def _norm(self, width: int) -> list[nn.Module]:
        if self.norm == "batch":
            return [nn.BatchNorm2d(width)]
        if self.norm == "group":  # up to 32 groups of >= 4 channels: more than one value per group even at 1x1
            return [nn.GroupNorm(gcd(32, max(1, width // 4)), width)]
        return []

    @staticmethod
    def receptive_field(num_layers: int = 3) -> int:
        """Side, in input pixels, of the patch one logit sees (16, 34, 70, 142 for num_layers 1..4)."""
        r = 1 + 3 + 3  # the two stride-1 4x4 convs
        for _ in range(num_layers):  # each stride-2 4x4 conv: r -> 2 (r - 1) + 4
            r = 2 * r + 2
        return r

    @staticmethod
    def min_input_size(num_layers: int = 3) -> int:
        """Smallest input height/width accepted: 2**num_layers (the logit map is then 1x1)."""
        return 2**num_layers

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (b, in_channels, H, W), H and W >= 2**num_layers -> logits (b, 1, H', W'), H' = H halved
        (floor) num_layers times. Raises ValueError on a wrong shape or a too-small input."""
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"expected images of shape (b, {self.in_channels}, H, W), got {tuple(images.shape)}")
        min_size = self.min_input_size(self.num_layers)
        if min(images.shape[-2:]) < min_size:
            raise ValueError(f"PatchDiscriminator(num_layers={self.num_layers}) needs inputs of at least "
                             f"{min_size}x{min_size} px (each of its {self.num_layers} stride-2 convs halves the "
                             f"size), got {tuple(images.shape[-2:])}; use fewer layers for smaller images")
        return self.main(images)


def _init_weights(m: nn.Module):
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


# --- adversarial losses ---------------------------------------------------------------------------------------
# Discriminator losses are halved (the mean of the real and the fake term), as taming, LlamaGen and MaskBit do for
# hinge. Google's MaskGIT does not halve; a regulariser weight (R1, LeCAM) tuned there is relative to a D loss
# twice as large as ours.


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss 0.5 * (mean(relu(1 - logits_real)) + mean(relu(1 + logits_fake))).

    Halved as in taming (`0.5 * (loss_real + loss_fake)`). Zero once real logits are >= 1 and fake ones <= -1.
    The two means are taken separately, so real and fake logit maps may have different sizes.
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def nonsaturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating (logistic, "vanilla") discriminator loss 0.5 * (mean(softplus(-real)) + mean(softplus(fake))).

    softplus(-x) = -log sigmoid(x) and softplus(x) = -log(1 - sigmoid(x)): binary cross-entropy with label 1 for
    real and 0 for fake, halved like `hinge_d_loss`. Equals log 2 when all logits are 0.
    """
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss paired with the hinge D loss: -mean(logits_fake) (no clipping: not saturating)."""
    return -logits_fake.mean()


def nonsaturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss mean(softplus(-logits_fake)) = mean(-log sigmoid(logits_fake))."""
    return F.softplus(-logits_fake).mean()


# --- balancing the GAN term -----------------------------------------------------------------------------------


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor,
                    max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """taming's adaptive GAN weight: ||d rec_loss / dW|| / (||d g_loss / dW|| + eps), clamped to [0, max_weight].

    W = `last_layer_weight`, the weight of the decoder's last layer (e.g. its final conv's `.weight`); norms are
    Frobenius norms over the whole tensor. Use as `loss = rec_loss + disc_weight * adaptive_weight(...) * g_loss`:
    the GAN gradient reaching the decoder output layer then has the size of the reconstruction gradient.
    `rec_loss` is whatever the GAN term is balanced against (taming: L1 + perceptual).

    Both gradients come from `torch.autograd.grad(..., retain_graph=True)`: the graphs stay usable for the
    backward pass that follows, and nothing is written to any `.grad`. Returns a detached 0-dim tensor (float32
    or the gradients' dtype if wider); no gradient flows through the weight itself.

    No gradient available -- called under `torch.no_grad()` / `torch.inference_mode()` (e.g. in evaluation), with
    a frozen `last_layer_weight`, with a loss that does not require grad, or with a weight that is not in the
    loss's graph -- raises RuntimeError saying which. There is no silent fallback (taming returns 0 in eval):
    a zero weight would switch the GAN term off without notice. In evaluation, do not call this; log the GAN loss
    unweighted or use the weight from the last training step.
    """
    if max_weight < 0 or eps <= 0:
        raise ValueError(f"need max_weight >= 0 and eps > 0, got {max_weight} and {eps}")
    if not torch.is_grad_enabled():
        raise RuntimeError("adaptive_weight needs autograd, but it is disabled (torch.no_grad / inference_mode, "
                           "e.g. during evaluation); compute the adaptive weight in training steps only")
    if not last_layer_weight.requires_grad:
        raise RuntimeError("adaptive_weight: last_layer_weight does not require grad (frozen decoder layer?); "
                           "pass the trainable weight of the decoder's last layer")
    grads = []
    for name, loss in (("rec_loss", rec_loss), ("g_loss", g_loss)):
        if not loss.requires_grad:
            raise RuntimeError(f"adaptive_weight: {name} does not require grad (computed without autograd, or "
                               f"from detached tensors)")
        (grad,) = torch.autograd.grad(loss, last_layer_weight, retain_graph=True, allow_unused=True)
        if grad is None:
            raise RuntimeError(f"adaptive_weight: {name} does not depend on last_layer_weight; pass the weight of "
                               f"the decoder layer that produced the reconstruction")
        grads.append(grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad)
    weight = grads[0].norm() / (grads[1].norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


# --- discriminator regularisers -------------------------------------------------------------------------------


def lecam_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, ema_real, ema_fake) -> torch.Tensor:
    """LeCAM regulariser (Tseng et al. 2021): mean(relu(real - ema_fake)**2) + mean(relu(ema_real - fake)**2).

    Pulls real logits down towards the running mean of fake logits and fake logits up towards the running mean
    of real ones (only where they have crossed it), which keeps D's outputs bounded with little data.
    The square is taken per element, then averaged (as in the paper's code). `ema_real` / `ema_fake` are floats
    or tensors (e.g. `LeCAMEMA` buffers) and are treated as constants (detached). MaskBit applies it to the
    batch-mean logits: pass `logits_real.mean()`, `logits_fake.mean()` to get that variant.
    Add to the D loss with a small weight (MaskBit: 0.001).
    """
    ema_real = torch.as_tensor(ema_real, dtype=logits_real.dtype, device=logits_real.device).detach()
    ema_fake = torch.as_tensor(ema_fake, dtype=logits_fake.dtype, device=logits_fake.device).detach()
    return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()


class LeCAMEMA(nn.Module):
    """Exponential moving averages of the mean real and mean fake logits, for `lecam_loss`.

    Buffers `ema_real`, `ema_fake` (0-dim float32, start at 0 as in the LeCAM and MaskBit code), so they are in
    `state_dict()` and checkpoint with the module that owns this one. Each update:
        ema_real <- decay * ema_real + (1 - decay) * mean(logits_real)   (same for fake; detached)
    With decay 0.999 the averages need a few thousand steps to warm up. Under DDP each rank keeps its own
    averages; all-reduce the mean logits before `update` if they must agree.

    `forward(logits_real, logits_fake)` returns `lecam_loss` against the averages as they were before this
    batch, then updates them if the module is in training mode (the MaskBit order). `loss` and `update` do the
    two halves separately.
    """

    def __init__(self, decay: float = 0.999):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        """One EMA step with the batch means of the (detached) logits."""
        for buf, logits in ((self.ema_real, logits_real), (self.ema_fake, logits_fake)):
            buf.mul_(self.decay).add_(logits.detach().float().mean().to(buf), alpha=1.0 - self.decay)

    def loss(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """`lecam_loss` against the current averages; no update."""
        return lecam_loss(logits_real, logits_fake, self.ema_real, self.ema_fake)

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        out = self.loss(logits_real, logits_fake)
        if self.training:
            self.update(logits_real, logits_fake)
        return out

    def extra_repr(self) -> str:
        return f"decay={self.decay}"


def r1_penalty(logits_real: torch.Tensor, images_real: torch.Tensor) -> torch.Tensor:
    """R1 gradient penalty (Mescheder et al. 2018): mean over the batch of ||d logits_real.sum() / d x_i||^2.

    `images_real` must be the tensor the logits were computed from, with requires_grad=True (e.g.
    `x = real.detach().requires_grad_()`, `logits = D(x)`). For a patch discriminator each image's gradient is
    that of the sum of its logits (images are independent unless D mixes the batch, e.g. BatchNorm in training
    mode). The gradient is taken with create_graph=True, so the penalty back-propagates into D's parameters.
    No gamma/2 factor: multiply by the weight you want (Google's MaskGIT: 10, on a D loss that is not halved).
    Computed in float32 when the gradient is half precision.
    """
    if not images_real.requires_grad:
        raise ValueError("r1_penalty: images_real must require grad and be the input the logits came from "
                         "(x = images.detach().requires_grad_(); logits = D(x))")
    (grad,) = torch.autograd.grad(logits_real.sum(), images_real, create_graph=True)
    if grad.dtype in (torch.float16, torch.bfloat16):
        grad = grad.float()
    return grad.pow(2).reshape(grad.shape[0], -1).sum(dim=1).mean()
