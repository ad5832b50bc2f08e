"""accelerate set-up shared by training and sampling."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def make_accelerator(run_dir, *, mixed_precision: str = "no", grad_accum: int = 1, cpu: bool = False,
                     find_unused_parameters: bool = False):
    """An Accelerator that logs to TensorBoard when it is installed and leaves the LR schedule to us.

    `find_unused_parameters` is for training phases that leave part of the model without gradients
    (a critic-only phase, say), which DistributedDataParallel otherwise rejects."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # `accelerate launch --multi_gpu` on a machine without GPUs (accelerate 1.x with a CUDA torch build):
        # accelerate sets up the CPU (gloo) process group only when asked for the CPU, and would otherwise run
        # N unrelated single-process copies. Pinned by tests/core/test_accel.py.
        cpu = True
    return Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        # We step the scheduler once per optimizer step ourselves; by default accelerate would step it once
        # per process, tying the schedule to the GPU count.
        step_scheduler_with_optimizer=False,
        log_with="tensorboard" if tensorboard_available() else None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / "logs")),
        cpu=cpu,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )
