"""Launched by tests/test_train_vq.py under `accelerate launch` with 2 CPU processes; writes a JSON verdict.

Checks what the exported weights (rank 0's) cannot show: after training on different data per process,
every process holds the same weights and, with codebook sync, the same VQ codebook; a model built without
codebook sync is the control that shows the comparison can tell the difference. Also checks that the
data sampler gives the processes disjoint shares of each step.
"""

import json
import sys
from pathlib import Path

import torch

from vqvae.config import VQConfig
from vqvae.model import VQVAE
from core.accel import make_accelerator
from core.order import StepBatchSampler

STEPS = 3


def same_on_all(accelerator, tensor) -> bool:
    """Whether `tensor` is identical on every process."""
    gathered = accelerator.gather(tensor.detach().float().reshape(1, -1))  # (processes, n)
    return bool((gathered == gathered[0]).all())


def train_copy(accelerator, cfg, sync_codebook):
    """A few steps on this process's own random images: (model, flat parameters, codebook, codebook after step 1)."""
    torch.manual_seed(0)  # the same initial weights on every process
    model = VQVAE(cfg, sync_codebook=sync_codebook)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    gen = torch.Generator().manual_seed(100 + accelerator.process_index)  # different data per process
    first = None
    for _ in range(STEPS):
        images = torch.rand(4, 3, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1
        loss = model(images).losses.total
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if first is None:
            first = accelerator.unwrap_model(model).quantizer._codebook.embed.detach().clone()
    inner = accelerator.unwrap_model(model)
    params = torch.cat([p.detach().reshape(-1) for p in inner.parameters()])
    return inner, params, inner.quantizer._codebook.embed.detach().clone(), first, images


def main(out_path: str) -> None:
    accelerator = make_accelerator(Path(out_path).parent, mixed_precision="no", grad_accum=1)
    cfg = VQConfig(image_size=8, channels=8, max_channels=8, norm_groups=4, num_res_blocks=1, latent_dim=4,
                   codebook_size=16, kmeans_iters=2)
    model, params, codebook, first, last_images = train_copy(accelerator, cfg, sync_codebook=None)  # from the group
    *_, control_codebook, _, _ = train_copy(accelerator, cfg, sync_codebook=False)

    sampler = StepBatchSampler(40, 8, seed=0, rank=accelerator.process_index,
                               world_size=accelerator.num_processes, total_steps=5)
    mine = torch.tensor(list(sampler))  # (steps, 4) this process's indices
    everyone = accelerator.gather(mine[None])  # (processes, steps, 4)
    shares_disjoint = all(
        len(set(everyone[:, s].reshape(-1).tolist())) == everyone[:, s].numel()
        and sorted(everyone[:, s].reshape(-1).tolist()) == sorted(sampler.global_indices(s).tolist())
        for s in range(everyone.shape[1]))

    verdict = {
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "built_with_sync": bool(model.sync_codebook),
        "data_differs": not same_on_all(accelerator, last_images),
        "params_equal": same_on_all(accelerator, params),
        "codebook_equal": same_on_all(accelerator, codebook),
        "codebook_moved": not torch.equal(codebook, first),
        "control_codebook_equal": same_on_all(accelerator, control_codebook),
        "shares_disjoint": shares_disjoint,
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
