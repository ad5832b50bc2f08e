"""Stage 1's VQGAN objective on top of the model's pixel and quantizer losses: LPIPS and a patch discriminator.

The generator (the tokenizer) minimises

    pixel + quantizer + perceptual_weight * LPIPS + disc_weight * lambda * G(D(recon))       (from `disc_start` on)

with lambda = |grad (pixel + perceptual_weight * LPIPS)| / |grad G| at the decoder's last layer when
`disc_adaptive` (taming), else 1. The discriminator minimises its hinge or non-saturating loss on real images
against the detached reconstructions, plus LeCAM and R1 when their weights are set. Formulas and the published
recipes: docs/gan_losses.md.
"""

from __future__ import annotations

from collections import namedtuple
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .config import VQTrainConfig
from .gan import (LeCAMEMA, PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss, nonsaturating_d_loss,
                  nonsaturating_g_loss, r1_penalty)
from .model import VQOutput
from .perceptual import HEADS_FILENAME, LPIPS, VGG16_FILENAME, PerceptualWeightsError

GeneratorLosses = namedtuple("GeneratorLosses", ["total", "recon", "quant", "perceptual", "gan", "gan_weight"])
DiscriminatorLosses = namedtuple("DiscriminatorLosses", ["total", "gan", "lecam", "r1"])

D_LOSSES = {"hinge": hinge_d_loss, "nonsaturating": nonsaturating_d_loss}
G_LOSSES = {"hinge": hinge_g_loss, "nonsaturating": nonsaturating_g_loss}


class Discriminator(nn.Module):
    """The patch discriminator with its regularisers. `forward(real, fake)` is its training loss, so that under
    DistributedDataParallel the gradients of every term are synchronised; `logits(images)` serves the generator."""

    def __init__(self, cfg: VQTrainConfig):
        super().__init__()
        self.net = PatchDiscriminator(3, cfg.disc_channels, cfg.disc_layers, cfg.disc_norm, cfg.disc_spectral_norm)
        self.lecam = LeCAMEMA() if cfg.lecam_weight > 0 else None  # its averages checkpoint with this module
        self.loss_fn = D_LOSSES[cfg.disc_loss]
        self.lecam_weight, self.r1_weight = cfg.lecam_weight, cfg.r1_weight

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> DiscriminatorLosses:
        real = real.detach().requires_grad_(self.r1_weight > 0)
        logits_real, logits_fake = self.net(real), self.net(fake.detach())
        gan = self.loss_fn(logits_real, logits_fake)
        zero = gan.new_zeros(())
        lecam = self.lecam(logits_real, logits_fake) if self.lecam is not None else zero
        r1 = r1_penalty(logits_real, real) if self.r1_weight > 0 else zero
        total = gan + self.lecam_weight * lecam + self.r1_weight * r1
        return DiscriminatorLosses(total, gan, lecam, r1)


@contextmanager
def frozen(module: nn.Module):
    """Parameters of `module` without gradients inside the block (a generator step must not touch D)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def generator_losses(out: VQOutput, images: torch.Tensor, cfg: VQTrainConfig, *, step: int,
                     perceptual: LPIPS | None, discriminator: Discriminator | None,
                     last_layer: torch.Tensor) -> GeneratorLosses:
    """The tokenizer's loss for one batch: its own pixel + quantizer losses, LPIPS, and D's verdict once D runs.

    `discriminator` is the unwrapped module (its parameters are frozen here); `last_layer` the decoder's final
    weight, where the adaptive weight compares gradients."""
    recon_loss, quant_loss = out.losses.recon, out.losses.quant
    zero = recon_loss.new_zeros(())
    lpips = perceptual(out.recon.float(), images.float()) if perceptual is not None else zero
    nll = recon_loss + cfg.perceptual_weight * lpips
    gan, weight = zero, zero
    if discriminator is not None and step >= cfg.disc_start:
        with frozen(discriminator):
            gan = G_LOSSES[cfg.disc_loss](discriminator.logits(out.recon).float())
        weight = adaptive_weight(nll, gan, last_layer) if cfg.disc_adaptive else torch.ones_like(gan)
    total = nll + quant_loss + cfg.disc_weight * weight * gan
    return GeneratorLosses(total, recon_loss, quant_loss, lpips, gan, weight)


def perceptual_paths(weights: str | None) -> tuple[Path | None, Path | None]:
    """(VGG16 file, heads file) from `--perceptual-weights`: a folder holding vgg16-397923af.pth (and optionally the
    LPIPS heads vgg.pth), or the VGG16 file itself; None for both means torch hub's cache and the lpips package."""
    if weights is None:
        return None, None
    path = Path(weights).expanduser()
    if path.is_dir():
        heads = path / HEADS_FILENAME
        return path / VGG16_FILENAME, heads if heads.is_file() else None
    return path, None


def load_perceptual(weights: str | None) -> LPIPS:
    """LPIPS with real weights for training; raises PerceptualWeightsError naming what to download."""
    return LPIPS.from_files(*perceptual_paths(weights))


def perceptual_if_present(weights: str | None) -> LPIPS | None:
    """LPIPS for evaluation when its weights are on this machine already (never downloads), else None."""
    vgg, heads = perceptual_paths(weights)
    if vgg is None:
        vgg = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME
    if not vgg.is_file():
        return None
    try:
        return LPIPS.from_files(vgg, heads)
    except PerceptualWeightsError:
        return None
