"""Launched by tests/e2e/test_train_vqgan.py under `accelerate launch` with 2 CPU processes; writes a JSON verdict.

Runs a few VQGAN updates the way vqvae/train.py does (`core.train.update_step` for the tokenizer, then for the
prepared discriminator on the same images and their reconstructions), each process on its own images, and checks
that every process ends with the same discriminator and tokenizer weights. A discriminator trained without
DistributedDataParallel is the control that shows the comparison can tell the difference.
"""

import json
import sys
from pathlib import Path

import torch

from core.accel import make_accelerator
from core.train import update_step
from vqvae.config import VQConfig, VQTrainConfig
from vqvae.model import VQVAE
from vqvae.objective import Discriminator, generator_losses

STEPS = 3
CFG = VQTrainConfig(disc_weight=0.5, disc_start=0, disc_channels=8, disc_layers=2)


def flat(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def same_on_all(accelerator, tensor) -> bool:
    gathered = accelerator.gather(tensor.float().reshape(1, -1))  # (processes, n)
    return bool((gathered == gathered[0]).all())


def main(out_path: str) -> None:
    accelerator = make_accelerator(Path(out_path).parent)
    torch.manual_seed(0)  # the same initial weights on every process
    model = VQVAE(VQConfig(image_size=8, channels=8, max_channels=8, norm_groups=4, num_res_blocks=1, latent_dim=4,
                           quantizer="fsq", fsq_levels=(3, 3)))
    disc, control = Discriminator(CFG), Discriminator(CFG)
    control.load_state_dict(disc.state_dict())
    start = flat(disc)
    optimizer, d_optimizer = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, disc))
    c_optimizer = torch.optim.AdamW(control.parameters(), lr=1e-2)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for o in (optimizer, d_optimizer)]
    model, optimizer, disc, d_optimizer, *schedules = accelerator.prepare(model, optimizer, disc, d_optimizer,
                                                                          *schedules)
    raw, raw_disc = accelerator.unwrap_model(model), accelerator.unwrap_model(disc)
    gen = torch.Generator().manual_seed(100 + accelerator.process_index)  # different data per process
    fail = lambda loss: f"loss {loss}"  # noqa: E731
    for step in range(STEPS):
        images = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1
        seen = []

        def tokenizer_loss(x):
            out = model(x)
            seen.append((x, out.recon.detach()))
            return generator_losses(out, x, CFG, step=step, perceptual=None, discriminator=raw_disc,
                                    last_layer=raw.last_layer)

        update_step(accelerator, model, optimizer, schedules[0], [images], tokenizer_loss, grad_clip=1.0,
                    skip_nonfinite=False, on_nonfinite=fail)
        update_step(accelerator, disc, d_optimizer, schedules[1], seen, lambda pair: disc(*pair), grad_clip=1.0,
                    skip_nonfinite=False, on_nonfinite=fail)
        control(*seen[0]).total.backward()  # the same update without DDP
        c_optimizer.step()
        c_optimizer.zero_grad()
    verdict = {
        "num_processes": accelerator.num_processes,
        "data_differs": not same_on_all(accelerator, images),
        "disc_moved": not torch.equal(flat(raw_disc), start),
        "disc_equal": same_on_all(accelerator, flat(raw_disc)),
        "tokenizer_equal": same_on_all(accelerator, flat(raw)),
        "control_equal": same_on_all(accelerator, flat(control)),
    }
    if accelerator.is_main_process:
        Path(out_path).write_text(json.dumps(verdict))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
