"""Convolutional VQ-VAE: images (b, 3, H, W) in [-1, 1] <-> integer code grids (b, H/f, W/f)."""

from collections import namedtuple
from math import log2

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from vector_quantize_pytorch import FSQ, LFQ, VectorQuantize

from .config import VQConfig

VQLosses = namedtuple("VQLosses", ["total", "recon", "quant"])
VQOutput = namedtuple("VQOutput", ["recon", "losses", "codes"])


class ResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) twice, 1x1 skip when the width changes."""

    def __init__(self, dim_in: int, dim_out: int, groups: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(groups, dim_in),
            nn.SiLU(),
            nn.Conv2d(dim_in, dim_out, 3, padding=1),
            nn.GroupNorm(groups, dim_out),
            nn.SiLU(),
            nn.Conv2d(dim_out, dim_out, 3, padding=1),
        )
        self.skip = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.block(x)


def stage_widths(cfg: VQConfig) -> list[int]:
    """Channel width at each resolution, full resolution first: doubling per 2x downsampling, capped."""
    num_down = int(log2(cfg.downsample))
    return [min(cfg.channels * 2**i, cfg.max_channels) for i in range(num_down + 1)]


class Encoder(nn.Module):
    """Images (b, 3, H, W) -> latents (b, d, H/f, W/f)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths, g = stage_widths(cfg), cfg.norm_groups
        layers = [nn.Conv2d(3, widths[0], 3, padding=1)]
        for i, width in enumerate(widths):
            dim_in = widths[max(i - 1, 0)]
            if i > 0:  # stride-2 conv: learned downsampling, keeps the width of the previous stage
                layers.append(nn.Conv2d(dim_in, dim_in, 3, stride=2, padding=1))
            layers += [ResBlock(dim_in if j == 0 else width, width, g) for j in range(cfg.num_res_blocks)]
            if cfg.num_res_blocks == 0 and dim_in != width:
                layers.append(nn.Conv2d(dim_in, width, 1))
        layers += [
            ResBlock(widths[-1], widths[-1], g),  # middle block at the code resolution
            nn.GroupNorm(g, widths[-1]),
            nn.SiLU(),
            nn.Conv2d(widths[-1], cfg.quantizer_dim, 1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, images):
        return self.net(images)


class Decoder(nn.Module):
    """Quantized latents (b, d, h, w) -> images (b, 3, h*f, w*f); the mirror of the encoder."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths, g = stage_widths(cfg)[::-1], cfg.norm_groups  # code resolution first
        layers = [nn.Conv2d(cfg.quantizer_dim, widths[0], 3, padding=1), ResBlock(widths[0], widths[0], g)]
        for i, width in enumerate(widths):
            dim_in = widths[max(i - 1, 0)]
            if i > 0:  # nearest upsampling + conv avoids the checkerboard artefacts of transposed convs
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim_in, dim_in, 3, padding=1)]
            layers += [ResBlock(dim_in if j == 0 else width, width, g) for j in range(cfg.num_res_blocks)]
            if cfg.num_res_blocks == 0 and dim_in != width:
                layers.append(nn.Conv2d(dim_in, width, 1))
        layers += [nn.GroupNorm(g, widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, latents):
        return self.net(latents)


def _process_group_is_active() -> bool:
    # asked afresh at construction: vector-quantize-pytorch caches its own `is_distributed()` forever
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def build_quantizer(cfg: VQConfig, sync_codebook: bool) -> nn.Module:
    """The one place where vector-quantize-pytorch is configured; every semantic option is explicit."""
    if cfg.quantizer == "fsq":
        return FSQ(
            levels=list(cfg.fsq_levels),
            dim=cfg.quantizer_dim,          # == len(levels): no upstream projections, the encoder does that
            channel_first=False,            # we always feed (b, h*w, d)
            preserve_symmetry=False,        # the original FSQ grid (levels >= 3, checked in VQConfig)
            noise_dropout=0.0,
            orthogonal_rotation=False,
            return_indices=True,
        )
    if cfg.quantizer == "lfq":
        return LFQ(
            dim=cfg.quantizer_dim,          # == log2(codebook_size): no upstream projections
            codebook_size=cfg.codebook_size,
            entropy_loss_weight=cfg.entropy_weight,
            commitment_loss_weight=cfg.commitment_weight,
            diversity_gamma=1.0,
            num_codebooks=1,
            channel_first=False,            # we always feed (b, h*w, d)
            has_projections=False,
            spherical=False,
            force_quantization_f32=True,
        )
    return VectorQuantize(
        dim=cfg.quantizer_dim,
        codebook_size=cfg.codebook_size,
        codebook_dim=None,                  # no upstream projections (their image-fmap shape bugs are moot too)
        heads=1,
        decay=cfg.codebook_decay,
        commitment_weight=cfg.commitment_weight,
        kmeans_init=True,                   # seeds the codebook from the first training batch
        kmeans_iters=cfg.kmeans_iters,
        threshold_ema_dead_code=cfg.dead_code_threshold,
        use_cosine_sim=cfg.codebook_l2_norm,  # l2-normalised codes and latents (LlamaGen, ViT-VQGAN)
        codebook_diversity_loss_weight=cfg.entropy_weight,
        rotation_trick=cfg.rotation_trick,
        straight_through=False,
        stochastic_sample_codes=False,      # argmax code assignment, also in training
        learnable_codebook=False,           # the codebook moves by EMA only, never by the optimizer
        ema_update=True,
        channel_last=True,                  # we always feed (b, h*w, d) ...
        accept_image_fmap=False,            # ... never the (b, d, h, w) path (see docs/upstream.md)
        sync_codebook=sync_codebook,        # all-reduce EMA statistics across processes
        sync_kmeans=True,                   # k-means init and dead-code re-seeding draw from all processes alike
    )


class VQVAE(nn.Module):
    """Convolutional VQ-VAE tokenizer with a VectorQuantize (EMA, k-means init), FSQ or LFQ bottleneck.

    Construct it after `Accelerator()` (or `init_process_group`): whether the codebook statistics are
    all-reduced across processes is decided here, at construction, from the live process group
    (`sync_codebook=None`), or forced with `sync_codebook=True/False`. With "vq" the codebook is seeded
    by k-means on the first forward pass (even in eval mode) of an unseeded model; under several processes
    that first pass must run on every process, since seeding is collective. Checkpoints store the seeded state.
    """

    def __init__(self, cfg: VQConfig, *, sync_codebook: bool | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.sync_codebook = _process_group_is_active() if sync_codebook is None else sync_codebook
        self.encoder = Encoder(cfg)
        self.quantizer = build_quantizer(cfg, self.sync_codebook)
        self.decoder = Decoder(cfg)

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.cfg.image_size // self.cfg.downsample
        return side, side

    @property
    def codebook_size(self) -> int:
        return self.cfg.effective_codebook_size

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's output conv: where the adaptive GAN weight compares gradient norms."""
        return self.decoder.net[-1].weight

    def _quantize(self, z, update_codebook: bool):
        """Latents (b, d, h, w) -> quantized latents (b, d, h, w), codes (b, h, w) int64, quantizer loss."""
        h, w = z.shape[-2:]
        z = rearrange(z, "b d h w -> b (h w) d")
        if self.cfg.quantizer == "fsq":
            quantized, codes = self.quantizer(z)
            loss = z.new_zeros(())  # FSQ needs no auxiliary loss
        elif self.cfg.quantizer == "lfq":
            quantized, codes, loss = self.quantizer(z)  # the entropy loss is only computed in training mode
        else:
            # freeze_codebook keeps the EMA statistics and dead-code counts untouched
            quantized, codes, loss = self.quantizer(z, freeze_codebook=not update_codebook)
        # contiguous in both paths, so decode(encode(x)) runs the decoder on the same memory layout
        quantized = rearrange(quantized, "b (h w) d -> b d h w", h=h, w=w).contiguous()
        codes = rearrange(codes.long(), "b (h w) -> b h w", h=h, w=w)
        return quantized, codes, loss

    @torch.no_grad()
    def encode(self, images):
        """Images (b, 3, H, W) in [-1, 1] -> codes (b, H/f, W/f) int64; never updates the codebook."""
        _, codes, _ = self._quantize(self.encoder(images), update_codebook=False)
        return codes

    def decode(self, codes):
        """Codes (b, h, w) int64 -> images (b, 3, h*f, w*f), roughly in [-1, 1]."""
        h, w = codes.shape[-2:]
        flat = rearrange(codes, "b h w -> b (h w)")
        if self.cfg.quantizer in ("fsq", "lfq"):
            quantized = self.quantizer.indices_to_codes(flat)  # (b, h*w, d)
        else:
            quantized = self.quantizer.get_output_from_indices(flat)  # (b, h*w, d)
        quantized = rearrange(quantized, "b (h w) d -> b d h w", h=h, w=w).contiguous()
        return self.decoder(quantized)

    def forward(self, images):
        """Reconstruct; the codebook (EMA, dead codes) updates only in training mode."""
        quantized, codes, quant_loss = self._quantize(self.encoder(images), update_codebook=self.training)
        recon = self.decoder(quantized)
        recon_fn = F.mse_loss if self.cfg.recon_loss == "mse" else F.l1_loss
        recon_loss = recon_fn(recon.float(), images.float())
        losses = VQLosses(total=recon_loss + quant_loss, recon=recon_loss, quant=quant_loss)
        return VQOutput(recon=recon, losses=losses, codes=codes)
