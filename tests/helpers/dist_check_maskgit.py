"""Launched by tests/test_train_maskgit.py under `accelerate launch` with 2 CPU processes; writes a JSON verdict.

Checks what the exported weights (rank 0's) cannot show: after stage-2 training on different code grids per
process, every process holds the same MaskGIT weights. Two set-ups, as train_maskgit.py builds them: a
self critic trained in separate phases (generator-only, then critic-only steps, which leave parameters
without gradients: DDP's find_unused_parameters path) and a separate critic trained jointly with a
self-conditioned generator. A copy trained without `accelerator.prepare` is the control that shows the
comparison can tell the difference.
"""

import copy
import json
import sys
from pathlib import Path

import torch

from maskgit.config import MaskGITConfig
from maskgit.model import build_maskgit
from core.accel import make_accelerator

CODEBOOK, GRID, CLASSES, BATCH = 16, (4, 4), 3, 4
GENERATOR_STEPS, CRITIC_STEPS = 3, 2


def same_on_all(accelerator, tensor) -> bool:
    """Whether `tensor` is identical on every process."""
    gathered = accelerator.gather(tensor.detach().float().reshape(1, -1))  # (processes, n)
    return bool((gathered == gathered[0]).all())


def flat(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def changed(before: dict, module) -> set[str]:
    """Names of the parameters that differ from the snapshot `before`."""
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def train(accelerator, model, phases, rank: int, prepare: bool = True):
    """Steps of AdamW on this process's own random code grids; phases: list of (only_train_generator,
    only_train_critic) per step. Returns the unwrapped model, parameters changed by each phase, last batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    wrapped, optimizer = accelerator.prepare(model, optimizer) if prepare else (model, optimizer)
    inner = accelerator.unwrap_model(wrapped)
    data = torch.Generator().manual_seed(100 + rank)  # different data on every process
    torch.manual_seed(1 + rank)  # and different masks, as independent processes would draw them
    changes, snapshot, last_phase = [], copy.deepcopy(inner.state_dict()), phases[0]
    for only_gen, only_critic in phases:
        if (only_gen, only_critic) != last_phase:
            changes.append(changed(snapshot, inner))
            snapshot, last_phase = copy.deepcopy(inner.state_dict()), (only_gen, only_critic)
        codes = torch.randint(CODEBOOK, (BATCH, *GRID), generator=data)  # (b, h, w)
        labels = torch.randint(CLASSES, (BATCH,), generator=data)
        losses = wrapped(codes, labels, only_train_generator=only_gen, only_train_critic=only_critic)
        accelerator.backward(losses.loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    changes.append(changed(snapshot, inner))
    return inner, changes, codes


def main(out_path: str) -> None:
    accelerator = make_accelerator(Path(out_path).parent, mixed_precision="no", grad_accum=1,
                                   find_unused_parameters=True)  # as train_maskgit.py with --train-critic separate
    rank = accelerator.process_index

    def build(**overrides):
        torch.manual_seed(0)  # the same initial weights on every process
        cfg = MaskGITConfig(dim=32, depth=1, heads=2, dropout=0.0, critic_depth=1, **overrides)
        return build_maskgit(cfg, codebook_size=CODEBOOK, grid=GRID, num_classes=CLASSES)

    phased = [(True, False)] * GENERATOR_STEPS + [(False, True)] * CRITIC_STEPS
    self_critic = build(critic="self")
    init = flat(self_critic).clone()
    control = copy.deepcopy(self_critic)
    self_critic, (generator_changed, critic_changed), last_codes = train(accelerator, self_critic, phased, rank)
    control, *_ = train(accelerator, control, phased, rank, prepare=False)
    joint, _, _ = train(accelerator, build(critic="separate", self_cond=True), [(False, False)] * 3, rank)

    verdict = {
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "data_differs": not same_on_all(accelerator, last_codes),
        "params_moved": not torch.equal(flat(self_critic), init),
        "params_equal": same_on_all(accelerator, flat(self_critic)),
        "joint_params_equal": same_on_all(accelerator, flat(joint)),
        "control_params_equal": same_on_all(accelerator, flat(control)),
        # what each phase updated (rank 0's view; params_equal says the other process agrees)
        "critic_phase_changed": sorted(critic_changed),
        "generator_phase_changed": sorted(generator_changed),
        "generator_params": sorted(k for k, _ in self_critic.named_parameters() if not k.startswith("critic_head")),
    }
    if accelerator.is_main_process:
        Path(out_path).write_text(json.dumps(verdict))
    accelerator.wait_for_everyone()
    # an explicit teardown: a gloo group left to the interpreter's exit can abort a process ("terminate called
    # without an active exception") after the work is done
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
