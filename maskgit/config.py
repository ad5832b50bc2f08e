"""Typed configuration of the stage-2 masked token transformer: the model, its training run, and named presets."""

from dataclasses import dataclass, fields
from typing import ClassVar

from core.train import TrainConfig

from .schedules import SCHEDULES

CRITICS = ("none", "self", "separate")
CLASS_CONDS = ("token", "adaln")
POSITIONS = ("sincos", "rope2d")
TRAIN_CRITIC = ("joint", "separate")


def _check_prob(name: str, value: float, *, closed_top: bool = True):
    if not (0.0 <= value <= 1.0 if closed_top else 0.0 <= value < 1.0):
        raise ValueError(f"{name}={value}: must be in [0, {'1]' if closed_top else '1)'}")


@dataclass
class MaskGITConfig:
    dim: int = 512                     # transformer width; a multiple of `heads` and of 4 (2D sin-cos positions)
    depth: int = 12                    # transformer blocks
    heads: int = 8                     # attention heads (head dim = dim / heads)
    ff_mult: int = 4                   # feed-forward hidden width = ff_mult * dim
    dropout: float = 0.1               # attention and feed-forward dropout
    ff_glu: bool = False               # SwiGLU feed-forward (x-transformers ff_glu + ff_swish) instead of GELU
    qk_norm: bool = False              # QK-norm: l2-normalised queries and keys with a learned scale
    positions: str = "sincos"          # "sincos": 2D sin-cos table added to the input; "rope2d": axial 2D rotary
    class_cond: bool = True            # condition on dataset labels (needs a labelled dataset); False: unconditional
    class_cond_mode: str = "token"     # "token": a prepended class token; "adaln": adaptive LayerNorm in every block
    cond_drop_prob: float = 0.1        # training: fraction of labels replaced by the null class (for CFG)
    schedule: str = "cosine"           # mask schedule m(t) for training (and the default for sampling)
    label_smoothing: float = 0.0       # cross-entropy label smoothing over the codebook
    mdlm_weight: bool = False          # weight the loss by the MDLM ELBO weight -m'(t)/m(t) (False: plain CE)
    no_replace_prob: float = 0.0       # BERT-style: fraction of masked places that show their true token
    random_token_prob: float = 0.0     # BERT-style: fraction of masked places that show a random code
    self_cond: bool = False            # self-conditioning on the previous prediction's embeddings
    self_cond_train_prob: float = 0.5  # training: probability (per batch) of running the self-conditioning pass
    critic: str = "none"               # token critic: "none", "self" (head on the generator) or "separate" (own net)
    critic_depth: int = 4              # "separate" critic: transformer blocks
    critic_dim: int = 0                # "separate" critic: width; 0 = same as `dim`
    critic_loss_weight: float = 1.0    # weight of the critic's BCE in the joint loss
    critic_temperature: float = 0.0    # temperature of the samples the critic learns on; 0 = U(0,1) per sample

    def validate(self):
        """Raise ValueError naming the field and the fix for any out-of-range value."""
        for name in ("dim", "depth", "heads", "ff_mult", "critic_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("dim", "critic_dim"):
            width = getattr(self, name) or self.dim
            if width % self.heads or width % 4:
                raise ValueError(
                    f"{name}={width}: must be divisible by heads={self.heads} and by 4; e.g. {self.heads * 64}"
                )
        if self.positions == "rope2d" and (self.dim // self.heads) % 4:
            raise ValueError(f"positions='rope2d' needs a head dim (dim / heads = {self.dim // self.heads}) "
                             "divisible by 4")
        if self.critic_dim < 0:
            raise ValueError(f"critic_dim={self.critic_dim}: must be >= 0 (0 = same as dim)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: choose one of {SCHEDULES}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r}: choose one of {POSITIONS}")
        if self.class_cond_mode not in CLASS_CONDS:
            raise ValueError(f"class_cond_mode={self.class_cond_mode!r}: choose one of {CLASS_CONDS}")
        if self.critic not in CRITICS:
            raise ValueError(f"critic={self.critic!r}: choose one of {CRITICS}")
        for name in ("dropout", "cond_drop_prob", "no_replace_prob", "random_token_prob", "self_cond_train_prob"):
            _check_prob(name, getattr(self, name))
        _check_prob("label_smoothing", self.label_smoothing, closed_top=False)
        if self.no_replace_prob + self.random_token_prob > 1:
            raise ValueError(
                f"no_replace_prob + random_token_prob = {self.no_replace_prob + self.random_token_prob} > 1: "
                "they split the masked places, so their sum must be <= 1"
            )
        if self.critic_loss_weight < 0:
            raise ValueError(f"critic_loss_weight={self.critic_loss_weight}: must be >= 0")
        if self.critic_temperature < 0:
            raise ValueError(f"critic_temperature={self.critic_temperature}: must be >= 0 (0 = random per sample)")

    def __post_init__(self):
        self.validate()


@dataclass
class MaskGITTrainConfig(TrainConfig):
    """Stage 2's training run: the shared fields of core.train.TrainConfig with MaskGIT's defaults, and its own."""

    steps: int = 100_000               # optimizer updates (each one global batch); generator(+critic) phase
    batch_size: int = 256              # code grids per optimizer update, summed over processes and accumulation
    lr: float = 3e-4                   # peak AdamW learning rate
    weight_decay: float = 0.045        # AdamW weight decay (matrices only: not norms, biases, the position scale)
    betas: tuple[float, float] = (0.9, 0.96)  # AdamW betas (MaskGIT's)
    warmup_steps: int = 2500           # linear warmup from 0 to `lr`
    eval_every: int = 5000             # steps between held-out evaluations (masked CE and accuracy)
    num_eval_images: int = 1000        # held-out code grids per evaluation
    ema_decay: float = 0.9999          # EMA of the weights used for eval and sampling; 0 disables EMA
    sample_every: int = 5000           # steps between sample grids written next to the checkpoints
    sample_steps: int = 12             # decoding steps for those previews
    num_sample_images: int = 64        # images per preview grid
    compile: bool = False              # torch.compile the model for training
    # Token-Critic (Lezama et al. 2022) trains its critic on a frozen, trained generator: "separate" runs `steps`
    # generator-only updates, then `critic_steps` critic-only updates (generator under no_grad; a "self" critic
    # then trains only its head). "joint" trains both with one summed loss for `steps` updates.
    train_critic: str = "joint"        # "joint" or "separate" (ignored when the model has no critic)
    critic_steps: int = 0              # "separate": critic-only updates after the generator phase
    # At the end of training the run scores these sampling settings on held-out data (maskgit.tune) and records
    # the best in config.json as sample.py's defaults.
    tune_sampling: bool = True         # measure and record sampling defaults at the end of training
    tune_cfg: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0)  # guidance scales tried (class-conditional models)
    tune_temperatures: tuple[float, ...] = (1.0, 0.8)   # token temperatures tried
    tune_choice_temperatures: tuple[float, ...] = (4.5,)  # Gumbel noise scales on the confidences tried (MaskGIT's)
    tune_remask: tuple[bool, ...] = (False, True)  # re-masking tried: off, on (SamplerConfig.remask)
    tune_samples: int = 250            # samples per setting (at least 8 per class)

    RESUMABLE: ClassVar[frozenset] = TrainConfig.RESUMABLE | {"critic_steps", "sample_every", "num_sample_images",
                                                              "sample_steps", "tune_sampling", "tune_cfg",
                                                              "tune_temperatures", "tune_choice_temperatures",
                                                              "tune_remask", "tune_samples"}
    POSITIVE: ClassVar[tuple] = TrainConfig.POSITIVE + ("sample_every", "sample_steps", "num_sample_images",
                                                        "tune_samples")
    NON_NEGATIVE: ClassVar[tuple] = TrainConfig.NON_NEGATIVE + ("critic_steps",)

    def validate(self):
        """Raise ValueError naming the field and the fix for any out-of-range value."""
        super().validate()
        _check_prob("ema_decay", self.ema_decay, closed_top=False)
        if not self.tune_cfg or any(w < 0 for w in self.tune_cfg):
            raise ValueError(f"tune_cfg={self.tune_cfg}: give one or more guidance scales >= 0")
        if not self.tune_temperatures or any(t <= 0 for t in self.tune_temperatures):
            raise ValueError(f"tune_temperatures={self.tune_temperatures}: give one or more temperatures > 0")
        if not self.tune_choice_temperatures or any(t < 0 for t in self.tune_choice_temperatures):
            raise ValueError(f"tune_choice_temperatures={self.tune_choice_temperatures}: give one or more choice "
                             "temperatures >= 0")
        if not self.tune_remask or len(set(self.tune_remask)) < len(self.tune_remask):
            raise ValueError(f"tune_remask={self.tune_remask}: give false, true or both, once each")
        if self.train_critic not in TRAIN_CRITIC:
            raise ValueError(f"train_critic={self.train_critic!r}: choose one of {TRAIN_CRITIC}")
        if self.train_critic == "separate" and self.critic_steps < 1:
            raise ValueError("train_critic='separate' needs critic_steps >= 1 (critic-only updates after `steps`)")
        if self.train_critic == "joint" and self.critic_steps:
            raise ValueError(f"critic_steps={self.critic_steps} is only used with train_critic='separate'")

    @property
    def total_steps(self) -> int:
        """Generator updates, then the critic-only ones of a separately trained critic."""
        return self.steps + self.critic_steps


def check_configs(cfg: MaskGITConfig, train_cfg: MaskGITTrainConfig):
    """Raise ValueError where the model and the training run disagree."""
    if train_cfg.train_critic == "separate" and cfg.critic == "none":
        raise ValueError("train_critic='separate' needs a critic: set critic='self' or 'separate'")


# The CLI exposes every field of both dataclasses as --field-name, so their names must not collide.
assert not {f.name for f in fields(MaskGITConfig)} & {f.name for f in fields(MaskGITTrainConfig)}

MASKGIT_PRESETS: dict[str, tuple[MaskGITConfig, MaskGITTrainConfig]] = {
    # About 4-6.5 CPU-minutes on 8x8 code grids with the final sampling measurement: ~0.25M parameters with the
    # tiny tokenizer's 125 codes. A small transformer trained for many steps beats a wider one trained for few in
    # the same CPU time: width 64 x 5,000 steps at lr 2e-3, against the earlier width 128 x 2,000 steps at lr
    # 1e-3, took the shapes from 71.8% to 86.2% recognised at the run's defaults and the digits' FD from 1.2x to
    # 1.0x its real-vs-real floor (bench/learning.py, docs/recipes.md). On the 600-step tokenizer of the time,
    # 6,500 steps instead of 5,000 lifted the guided shapes' weakest class (star) from 82-83% to 85-86% (two draws of
    # 3,000); depth 3 x 7,000 steps and width 48 x 7,000 did no better than 5,000 steps at depth 4 (docs/recipes.md,
    # "More steps"). With the 900-step tokenizer 5,000 steps are enough (shapes 98.5-98.9% recognised, no class
    # below 92%; 5,500 steps: 99.0-99.1%, 94%) and keep both stages under 10 CPU-minutes on a slower host (530 CPU-s
    # in all on an AMD EPYC core, where 6,500 steps and the 600-step tokenizer took 604; docs/recipes.md, "A
    # longer-trained tokenizer"). Adaptive-LayerNorm class conditioning: on the
    # shapes, guided samples were recognised 91.8% of the time against 79.4% with a class token, on the digits
    # 98.2% against 98.0% at no guidance, for the same CPU time (bench/sweep.py, docs/recipes.md); unconditional
    # runs have no class and use neither.
    # The sampling measurement tries guidance 1 and 2 with re-masking, at token temperature 1 and choice
    # temperature 4.5. In every tiny run measured the judge recognised the most shapes at guidance 1 or 2 with
    # re-masking (re-masking: +1.4 to +3.2 points). Guidance 0 left the grid because the measurement's code
    # classifier cannot see a star drawn as a blob: on two 7,000-step shapes runs it picked guidance 0 with
    # re-masking, which the judge recognised 3-7 points less often than guidance 1 with re-masking (star 38-66%).
    # Token temperature 0.8 was never clearly better than 1, nor choice temperature 2 than 4.5 (docs/recipes.md,
    # "Sampling defaults measured at the end of training").
    "tiny": (
        MaskGITConfig(dim=64, depth=4, heads=4, dropout=0.0, class_cond_mode="adaln"),
        MaskGITTrainConfig(
            steps=5000, batch_size=32, lr=2e-3, weight_decay=0.01, betas=(0.9, 0.99), warmup_steps=250,
            ema_decay=0.999, eval_every=500, sample_every=1000, sample_steps=8, num_sample_images=16,
            save_every=1000, num_eval_images=256, num_workers=0, tune_cfg=(1.0, 2.0), tune_temperatures=(1.0,),
            tune_remask=(True,),
        ),
    ),
    # A GPU run on CIFAR-10 codes (8x8 from the "cifar10" tokenizer; ~38M parameters).
    "cifar10": (
        MaskGITConfig(dim=512, depth=12, heads=8, dropout=0.1, label_smoothing=0.1),
        MaskGITTrainConfig(
            steps=100_000, batch_size=256, lr=3e-4, weight_decay=0.045, betas=(0.9, 0.96), warmup_steps=2500,
            ema_decay=0.9999, eval_every=5000, sample_every=5000, save_every=10_000, num_eval_images=1000,
            mixed_precision="bf16", num_workers=4,
        ),
    ),
    # 16x16 code grids (the imagenet64 tokenizer, or a published f=16 tokenizer at 256 px): cifar10's transformer
    # with a longer warm-up.
    "imagenet64": (
        MaskGITConfig(dim=512, depth=12, heads=8, dropout=0.1, label_smoothing=0.1),
        MaskGITTrainConfig(
            steps=200_000, batch_size=256, lr=3e-4, weight_decay=0.045, betas=(0.9, 0.96), warmup_steps=5000,
            ema_decay=0.9999, eval_every=5000, sample_every=10_000, save_every=10_000, num_eval_images=1000,
            mixed_precision="bf16", num_workers=4,
        ),
    ),
    # ImageNet 256 on 16x16 codes (the imagenet256 tokenizer or a published f=16 one): ~196M parameters with 16384
    # codes, between Halton-MaskGIT's B and L sizes; train with --token-views tencrop (LlamaGen's ten crops).
    "imagenet256": (
        MaskGITConfig(dim=768, depth=24, heads=12, dropout=0.1, label_smoothing=0.1),
        MaskGITTrainConfig(
            steps=500_000, batch_size=512, lr=2e-4, weight_decay=0.045, betas=(0.9, 0.96), warmup_steps=10_000,
            ema_decay=0.9999, eval_every=10_000, sample_every=10_000, save_every=10_000, num_eval_images=1000,
            mixed_precision="bf16", num_workers=4,
        ),
    ),
}
