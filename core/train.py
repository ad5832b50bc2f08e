"""What both training loops share: the training config base, the optimizer and LR schedule, the update step, the EMA.

One update step = `grad_accum` micro-batches under `accelerator.accumulate`, a non-finite check that every
process agrees on, gradient clipping, the optimizer step and the EMA, all only when gradients are in sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

import torch

from .cli import ClearError

MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """The fields every training run has; each stage subclasses it with its own defaults and extra fields."""

    steps: int = 100_000               # optimizer updates (each one global batch)
    batch_size: int = 128              # items per optimizer update, summed over processes and accumulation
    lr: float = 2e-4                   # peak AdamW learning rate
    weight_decay: float = 0.0          # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW betas
    lr_schedule: str = "cosine"        # "constant" or "cosine" (decays to 0 at `steps`), after warmup
    warmup_steps: int = 1000           # linear warmup from 0 to `lr`
    grad_clip: float = 1.0             # max global gradient norm; 0 disables clipping
    eval_every: int = 5000             # steps between held-out evaluations
    save_every: int = 10_000           # steps between checkpoints
    keep_last: int = 3                 # checkpoints to keep on disk (older ones are deleted)
    num_eval_images: int = 1000        # held-out items per evaluation
    seed: int = 0                      # seeds torch: weights, data order, augmentation
    mixed_precision: str = "no"        # "no", "fp16" or "bf16" (passed to accelerate)
    grad_accum: int = 1                # micro-batches per optimizer update
    num_workers: int = 4               # DataLoader worker processes per training process

    # settings a resumed run may change; every other one must match the run folder
    RESUMABLE: ClassVar[frozenset] = frozenset({"steps", "eval_every", "save_every", "keep_last", "num_workers",
                                                "num_eval_images"})
    POSITIVE: ClassVar[tuple] = ("steps", "batch_size", "eval_every", "save_every", "keep_last", "num_eval_images",
                                 "grad_accum")
    NON_NEGATIVE: ClassVar[tuple] = ("weight_decay", "warmup_steps", "grad_clip", "num_workers")

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)  # lists from JSON/CLI become tuples
        self.validate()

    def validate(self):
        """Raise ValueError naming the field and the fix for any out-of-range value."""
        for name in self.POSITIVE:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in self.NON_NEGATIVE:
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr}: must be a finite number > 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={self.betas}: need two values in [0, 1), e.g. (0.9, 0.99)")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}: "
                             "the micro-batch would not be whole")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r}: choose one of {LR_SCHEDULES}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision={self.mixed_precision!r}: choose one of {MIXED_PRECISION}")


# ----------------------------------------------------------------------------------------------
# Optimizer and learning rate


def adamw(model: torch.nn.Module, cfg: TrainConfig, *, decay: Callable[[torch.nn.Parameter], bool] | None = None):
    """AdamW with the config's LR, betas and weight decay; `decay(p)` picks the parameters that decay (default all)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay is None:
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    else:
        groups = [{"params": [p for p in params if decay(p)], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if not decay(p)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def lr_factor(kind: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """LR multiplier per step: linear warm-up, then constant or cosine decay to `min_ratio` at `total_steps`."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown LR schedule {kind!r}: choose one of {LR_SCHEDULES}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def lr_schedule(optimizer, kind: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """A LambdaLR following `lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(kind, warmup_steps, total_steps, min_ratio))


# ----------------------------------------------------------------------------------------------
# EMA of the weights


def ema_with_warmup(decay: float):
    """EMA update for AveragedModel whose decay grows as (1 + n) / (10 + n) up to `decay` after n updates.

    A fixed decay would keep a share decay**n of the random initial weights: 37% after 1,000 updates at 0.999."""

    @torch.no_grad()
    def update(averaged: list, current: list, num_averaged) -> None:
        n = int(num_averaged)
        weight = 1 - min(decay, (1 + n) / (10 + n))
        for avg, new in zip(averaged, current):
            avg.lerp_(new, weight)

    return update


def make_ema(model: torch.nn.Module, decay: float):
    """An AveragedModel of `model` (buffers included) with the warm-up above; None when `decay` is 0."""
    from torch.optim.swa_utils import AveragedModel

    return AveragedModel(model, multi_avg_fn=ema_with_warmup(decay), use_buffers=True) if decay > 0 else None


# ----------------------------------------------------------------------------------------------
# The update step


class NonFiniteLossError(ClearError):
    """The loss became NaN or infinite."""


def check_finite(loss: torch.Tensor, accelerator) -> bool:
    """True when the loss is finite on every process (all processes reach the same verdict)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    return accelerator.reduce(bad, reduction="sum").item() == 0


def nonfinite_message(loss: torch.Tensor, step: int, checkpoints) -> str:
    """What to tell the user when the loss stops being finite during update `step + 1`."""
    kept = checkpoints.all()
    return (f"loss is {loss.item()} at step {step + 1}: the run stops here and keeps its last checkpoint "
            f"({kept[-1] if kept else 'none was written yet'}). Lower --lr or use --mixed-precision no and "
            "continue with --resume, or pass --skip-nonfinite to skip such steps")


@dataclass
class Update:
    """What one update step reports: the last micro-batch's losses and whether the update was dropped."""

    losses: tuple         # the loss function's namedtuple; its first field is the loss that is minimised
    skipped: bool         # a micro-batch had a non-finite loss and --skip-nonfinite dropped the whole update
    items: int            # items this process consumed


def update_step(accelerator, model, optimizer, scheduler, micro_batches: Iterable, loss_fn: Callable, *,
                grad_clip: float, skip_nonfinite: bool, on_nonfinite: Callable[[torch.Tensor], str],
                after_step: Callable[[], None] | None = None) -> Update:
    """One optimizer update over `micro_batches` (one per accumulation step): forward, backward, clip, step.

    `loss_fn(batch)` returns a namedtuple whose first field is the scalar to minimise. A non-finite loss on
    any process raises NonFiniteLossError(on_nonfinite(loss)), or with `skip_nonfinite` drops the whole
    update; buffers a training forward moved (an EMA codebook) are put back, so a skipped update changes
    nothing. `after_step()` runs after each optimizer step (the EMA update)."""
    skipped, items, losses = False, 0, None
    for batch in micro_batches:
        with accelerator.accumulate(model):
            kept = {n: b.detach().clone() for n, b in model.named_buffers()} if skip_nonfinite else None
            losses = loss_fn(batch)
            loss = losses[0]
            if check_finite(loss, accelerator):
                accelerator.backward(loss)
            elif skip_nonfinite:
                skipped = True
                with torch.no_grad():
                    for name, buffer in model.named_buffers():
                        buffer.copy_(kept[name])
            else:
                raise NonFiniteLossError(on_nonfinite(loss))
            if accelerator.sync_gradients:
                if not skipped:  # a skipped update leaves weights, optimizer state and EMA as they were
                    if grad_clip > 0:
                        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
                    optimizer.step()
                    if after_step is not None:
                        after_step()
                optimizer.zero_grad(set_to_none=True)
        items += len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)
    scheduler.step()
    return Update(losses, skipped, items)


def train_record(accelerator, state, cfg: TrainConfig, scheduler, losses: dict, speed) -> dict:
    """The training half of a metrics line: counters, LR, throughput and each loss averaged over processes."""
    record = {"step": state.step, "images_seen": state.images_seen, "global_batch": cfg.batch_size,
              "lr": scheduler.get_last_lr()[0], "skipped_steps": state.skipped_steps, **speed.read()}
    for name, value in losses.items():
        if value is not None:
            record[name] = accelerator.reduce(value.detach().float(), "mean").item()
    return record
