"""Typed configuration of the stage-1 tokenizer: the model, its training run, and named presets."""

from dataclasses import dataclass, fields
from math import prod

from core.train import TrainConfig

QUANTIZERS = ("vq", "fsq")
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
    latent_dim: int = 64               # quantizer input dim for "vq"; "fsq" uses len(fsq_levels) instead
    quantizer: str = "vq"              # "vq" (EMA codebook, k-means init, dead-code replacement) or "fsq"
    codebook_size: int = 512           # number of codes for "vq"; for "fsq" it is prod(fsq_levels)
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
        return self.codebook_size if self.quantizer == "vq" else prod(self.fsq_levels)

    @property
    def quantizer_dim(self) -> int:
        """Channels of the latent grid that the quantizer sees."""
        return self.latent_dim if self.quantizer == "vq" else len(self.fsq_levels)

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
    eval_every: int = 5000             # steps between held-out evaluations (PSNR, codebook usage)
    num_eval_images: int = 1000        # held-out images per evaluation


# The CLI exposes every field of both dataclasses as --field-name, so their names must not collide.
assert not {f.name for f in fields(VQConfig)} & {f.name for f in fields(VQTrainConfig)}

VQ_PRESETS: dict[str, tuple[VQConfig, VQTrainConfig]] = {
    # About 1.5 CPU-minutes at 32x32 (f=4 -> 8x8 codes). 64 FSQ codes: a small vocabulary is what lets the
    # tiny stage-2 preset learn in CPU minutes (512 codes gave sharper reconstructions but stage-2 samples
    # near chance on shapes), and FSQ's less evenly used codes were easier for stage 2 than VectorQuantize's
    # at equal size (bench/learning.py: digits 99.0% vs 96.6% recognised, shapes 77.0% vs 70.6%, at cfg 3).
    "tiny": (
        VQConfig(channels=16, max_channels=32, num_res_blocks=1, norm_groups=8, latent_dim=16, quantizer="fsq",
                 codebook_size=64, fsq_levels=(4, 4, 4)),
        VQTrainConfig(
            steps=600, batch_size=32, lr=2e-3, warmup_steps=50, eval_every=200, save_every=200,
            num_eval_images=256, num_workers=0,
        ),
    ),
    # A GPU run on CIFAR-10 (32x32, f=4 -> 8x8 codes).
    "cifar10": (
        VQConfig(channels=128, max_channels=256, num_res_blocks=2, norm_groups=32, latent_dim=32, codebook_size=1024),
        VQTrainConfig(
            steps=100_000, batch_size=128, lr=2e-4, warmup_steps=1000, eval_every=5000, save_every=10_000,
            num_eval_images=1000, mixed_precision="bf16", num_workers=4,
        ),
    ),
}
