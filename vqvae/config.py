"""Typed configuration of the stage-1 tokenizer: the model, its training run, and named presets."""

from dataclasses import dataclass, fields
from typing import ClassVar
from math import prod

from core.train import TrainConfig

QUANTIZERS = ("vq", "fsq", "lfq")
DISC_LOSSES = ("hinge", "nonsaturating")
DISC_NORMS = ("group", "batch", "none")
RECON_LOSSES = ("mse", "l1")


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


@dataclass
class VQConfig:
    image_size: int = 32               # training resolution (square); any multiple of `downsample` works at inference
    downsample: int = 4                # spatial factor f, a power of 2: 32x32 -> 8x8 codes at f=4
    channels: int = 64                 # width at full resolution; doubles after every 2x downsampling...
    max_channels: int = 256            # ...up to this cap, so f=8 does not explode the bottom width
    num_res_blocks: int = 2            # residual blocks per resolution, in the encoder and in the decoder
    norm_groups: int = 32              # GroupNorm groups; must divide `channels` and `max_channels`
    latent_dim: int = 64               # code dimension for "vq" (8 + codebook_l2_norm: LlamaGen's factorised codes);
                                       # "fsq" uses len(fsq_levels), "lfq" log2(codebook_size) instead
    quantizer: str = "vq"              # "vq" (EMA codebook, k-means init, dead-code replacement), "fsq", or "lfq"
                                       # (lookup-free: one sign bit per channel, MAGVIT-v2 / MaskBit)
    codebook_size: int = 512           # number of codes for "vq" and "lfq" (a power of 2); for "fsq" prod(fsq_levels)
    codebook_l2_norm: bool = False     # "vq": l2-normalised codes and latents, matched by cosine similarity
    entropy_weight: float = 0.0        # "lfq": weight of its entropy loss (per-code confidence, batch diversity);
                                       # "vq": of the codebook-diversity loss (minus the entropy of mean assignment)
    fsq_levels: tuple[int, ...] = (8, 8, 8)  # levels per FSQ channel (each >= 3); (8, 8, 8) -> 512 codes
    commitment_weight: float = 0.25    # weight of ||z - sg(q)||^2 pulling encoder outputs onto codes ("vq" only)
    codebook_decay: float = 0.99       # EMA decay of codebook statistics ("vq"; upstream default 0.8)
    dead_code_threshold: float = 1.0   # "vq": codes whose EMA usage count per batch drops below this are re-seeded
    kmeans_iters: int = 10             # "vq": k-means iterations on the first training batch to seed the codebook
    rotation_trick: bool = True        # "vq": rotation-trick gradient estimator (False: plain straight-through)
    recon_loss: str = "mse"            # "mse" or "l1" pixel reconstruction loss (no GAN, no LPIPS)

    def __post_init__(self):
        self.fsq_levels = tuple(int(level) for level in self.fsq_levels)  # lists from JSON/CLI become tuples
        self.validate()

    @property
    def effective_codebook_size(self) -> int:
        """Number of distinct codes, whichever quantizer is used."""
        return prod(self.fsq_levels) if self.quantizer == "fsq" else self.codebook_size

    @property
    def quantizer_dim(self) -> int:
        """Channels of the latent grid that the quantizer sees."""
        if self.quantizer == "fsq":
            return len(self.fsq_levels)
        return self.codebook_size.bit_length() - 1 if self.quantizer == "lfq" else self.latent_dim

    def validate(self):
        """Raise ValueError naming the field and the fix for any out-of-range value."""
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer={self.quantizer!r}: choose one of {QUANTIZERS}")
        if self.recon_loss not in RECON_LOSSES:
            raise ValueError(f"recon_loss={self.recon_loss!r}: choose one of {RECON_LOSSES}")
        if not _is_power_of_two(self.downsample) or self.downsample < 2:
            raise ValueError(f"downsample={self.downsample}: must be a power of 2 >= 2 (2, 4, 8, 16)")
        if self.image_size < 1 or self.image_size % self.downsample:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by downsample={self.downsample}: "
                f"pick an image_size that is a multiple of {self.downsample}"
            )
        for name in ("channels", "max_channels", "norm_groups", "latent_dim", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.num_res_blocks < 0:
            raise ValueError(f"num_res_blocks={self.num_res_blocks}: must be >= 0")
        if self.max_channels < self.channels:
            raise ValueError(f"max_channels={self.max_channels} < channels={self.channels}: raise max_channels")
        for name in ("channels", "max_channels"):
            if getattr(self, name) % self.norm_groups:
                raise ValueError(
                    f"{name}={getattr(self, name)} is not divisible by norm_groups={self.norm_groups}: "
                    f"use a norm_groups that divides both channels and max_channels"
                )
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size={self.codebook_size}: must be >= 2")
        if self.quantizer == "lfq" and not _is_power_of_two(self.codebook_size):
            raise ValueError(f"codebook_size={self.codebook_size}: lfq needs a power of 2 (one bit per channel)")
        if self.entropy_weight < 0:
            raise ValueError(f"entropy_weight={self.entropy_weight}: must be >= 0")
        if len(self.fsq_levels) < 1 or any(level < 3 for level in self.fsq_levels):
            # level 2 needs upstream's `preserve_symmetry` mode, a different grid; we keep one grid
            raise ValueError(f"fsq_levels={self.fsq_levels}: need at least one level, each >= 3")
        if self.commitment_weight < 0:
            raise ValueError(f"commitment_weight={self.commitment_weight}: must be >= 0")
        if not 0.0 < self.codebook_decay < 1.0:
            raise ValueError(f"codebook_decay={self.codebook_decay}: must be in (0, 1), e.g. 0.99")
        if self.dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold={self.dead_code_threshold}: must be >= 0 (0 disables replacement)")


@dataclass
class VQTrainConfig(TrainConfig):
    """Stage 1's training run: the shared fields of core.train.TrainConfig, with the tokenizer's defaults."""

    steps: int = 100_000               # optimizer updates (each one global batch of images)
    batch_size: int = 128              # images per optimizer update, summed over processes and accumulation
    lr: float = 2e-4                   # peak AdamW learning rate
    eval_every: int = 5000             # steps between held-out evaluations (PSNR, SSIM, LPIPS, codebook usage)
    num_eval_images: int = 1000        # held-out images per evaluation
    # Perceptual and adversarial terms (VQGAN): see docs/gan_losses.md. Each is off at weight 0.
    perceptual_weight: float = 0.0     # weight of the LPIPS (VGG16) distance between images and reconstructions
    perceptual_weights: str | None = None  # folder or file with vgg16-397923af.pth (+ LPIPS heads vgg.pth);
                                           # None: torch hub's cache (downloaded once when online)
    disc_weight: float = 0.0           # generator-side weight of the patch discriminator's loss; 0 = no GAN
    disc_start: int = 0                # optimizer step at which the discriminator starts (taming, LlamaGen: late)
    disc_adaptive: bool = True         # scale the GAN term by |grad recon| / |grad GAN| at the decoder's last layer
    disc_loss: str = "hinge"           # "hinge" or "nonsaturating"
    disc_channels: int = 64            # PatchGAN width of the first layer
    disc_layers: int = 3               # PatchGAN stride-2 layers (3: 70 px receptive field)
    disc_norm: str = "group"           # "group", "batch" or "none"
    disc_spectral_norm: bool = False   # spectral normalisation on every discriminator conv
    disc_lr: float = 0.0               # discriminator AdamW learning rate; 0 = the same as `lr`
    lecam_weight: float = 0.0          # LeCAM regularisation of the discriminator (MaskBit 0.001)
    r1_weight: float = 0.0             # R1 gradient penalty on real images (Google MaskGIT 10)
    num_rfid_images: int = 0           # held-out images for rFID at each evaluation (torch-fidelity); 0 = off

    NON_NEGATIVE: ClassVar[tuple] = TrainConfig.NON_NEGATIVE + (
        "perceptual_weight", "disc_weight", "disc_start", "disc_lr", "lecam_weight", "r1_weight", "num_rfid_images")

    def validate(self):
        super().validate()
        if self.disc_loss not in DISC_LOSSES:
            raise ValueError(f"disc_loss={self.disc_loss!r}: choose one of {DISC_LOSSES}")
        if self.disc_norm not in DISC_NORMS:
            raise ValueError(f"disc_norm={self.disc_norm!r}: choose one of {DISC_NORMS}")
        if self.disc_channels < 1 or self.disc_layers < 1:
            raise ValueError(f"disc_channels={self.disc_channels}, disc_layers={self.disc_layers}: must be >= 1")

    @property
    def uses_gan(self) -> bool:
        return self.disc_weight > 0


# The CLI exposes every field of both dataclasses as --field-name, so their names must not collide.
assert not {f.name for f in fields(VQConfig)} & {f.name for f in fields(VQTrainConfig)}

VQ_PRESETS: dict[str, tuple[VQConfig, VQTrainConfig]] = {
    # About 2-2.5 CPU-minutes at 32x32 (f=4 -> 8x8 codes). 125 FSQ codes (5x5x5): a small vocabulary is what lets
    # the tiny stage-2 preset learn in CPU minutes (512 codes gave sharper reconstructions but stage-2 samples
    # near chance on shapes), and FSQ's less evenly used codes were easier for stage 2 than VectorQuantize's
    # at equal size (bench/learning.py: digits 99.0% vs 96.6% recognised, shapes 77.0% vs 70.6%, at cfg 3).
    # 125 codes against 64 (4x4x4): the judge recognises 99.6% of the shapes' reconstructions (worst class 96%)
    # against 97.0% (86%), and the width-64 stage-2 preset learns them as well (shapes at guidance 1: 94.5%
    # against 92.1% recognised, bench/quality.py; digits unchanged; docs/recipes.md). 900 steps instead of 600
    # (about 40 CPU-s more): the judge recognises 99.8% of its reconstructions of real shapes against 98.9% (star 98%
    # against 93%, FD 105 against 231), and with the 5,000-step stage-2 preset two runs of the shapes drew 98.9% and
    # 98.5% with no class below 92%, where 600 steps with 6,500 stage-2 steps drew 96.8-97.2% with star or diamond at
    # 85-88% (docs/recipes.md, "A longer-trained tokenizer").
    "tiny": (
        VQConfig(channels=16, max_channels=32, num_res_blocks=1, norm_groups=8, latent_dim=16, quantizer="fsq",
                 codebook_size=125, fsq_levels=(5, 5, 5)),
        VQTrainConfig(
            steps=900, batch_size=32, lr=2e-3, warmup_steps=50, eval_every=200, save_every=200,
            num_eval_images=256, num_workers=0,
        ),
    ),
    # A GPU run on CIFAR-10 (32x32, f=4 -> 8x8 codes) with LlamaGen's VQ recipe scaled to 32 px (no published
    # CIFAR-10 tokenizer exists to follow): MSE + LPIPS 1.0 + PatchGAN hinge 0.5 (fixed weight) from 20% of the
    # steps, 1024 l2-normalised codes of dimension 8, AdamW (0.9, 0.95) with weight decay 0.05, bf16.
    "cifar10": (
        VQConfig(channels=128, max_channels=256, num_res_blocks=2, norm_groups=32, latent_dim=8, codebook_size=1024,
                 codebook_l2_norm=True),
        VQTrainConfig(
            steps=100_000, batch_size=128, lr=2e-4, weight_decay=0.05, betas=(0.9, 0.95), warmup_steps=1000,
            eval_every=5000, save_every=10_000, num_eval_images=1000, mixed_precision="bf16", num_workers=4,
            perceptual_weight=1.0, disc_weight=0.5, disc_start=20_000, disc_adaptive=False, num_rfid_images=1000,
        ),
    ),
    # ImageNet (or a photo folder) at 64 px, f=4 -> 16x16 codes: the cifar10 recipe with 8192 codes.
    "imagenet64": (
        VQConfig(image_size=64, downsample=4, channels=128, max_channels=256, num_res_blocks=2, norm_groups=32,
                 latent_dim=8, codebook_size=8192, codebook_l2_norm=True),
        VQTrainConfig(
            steps=200_000, batch_size=256, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95), warmup_steps=2000,
            eval_every=5000, save_every=10_000, num_eval_images=1000, mixed_precision="bf16", num_workers=8,
            perceptual_weight=1.0, disc_weight=0.5, disc_start=20_000, disc_adaptive=False, num_rfid_images=5000,
        ),
    ),
    # ImageNet at 256 px, f=16 -> 16x16 codes: LlamaGen's VQ-16 recipe (FoundationVision/LlamaGen, vq_train.py;
    # reported rFID 2.19 on ImageNet val with 16x16 codes): 16384 l2-normalised codes of dimension 8, MSE + LPIPS 1.0
    # + PatchGAN hinge 0.5 from step 20k, commitment 0.25, AdamW lr 1e-4 (0.9, 0.95) wd 0.05, global batch 128,
    # bf16, 40 epochs (~400k steps). The encoder is this toolkit's (widths 128-256-512-512-512, 2 blocks per level);
    # LlamaGen's is 128-128-256-256-512.
    "imagenet256": (
        VQConfig(image_size=256, downsample=16, channels=128, max_channels=512, num_res_blocks=2, norm_groups=32,
                 latent_dim=8, codebook_size=16384, codebook_l2_norm=True, commitment_weight=0.25),
        VQTrainConfig(
            steps=400_000, batch_size=128, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95), lr_schedule="constant",
            warmup_steps=0, eval_every=10_000, save_every=10_000, num_eval_images=1000, mixed_precision="bf16",
            num_workers=8, perceptual_weight=1.0, disc_weight=0.5, disc_start=20_000, disc_adaptive=False,
            num_rfid_images=5000,
        ),
    ),
}
