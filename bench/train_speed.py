"""Training speed of both stages: steps/s, images/s and peak memory of one optimizer update.

    python bench/train_speed.py                        # the tiny presets on the CPU
    python bench/train_speed.py --vq-preset cifar10 --maskgit-preset cifar10 --device cuda
    python bench/train_speed.py --quick                # seconds: a smoke test

Each row times the update the training scripts make, through their own code: `core.train.update_step` (forward,
non-finite check, backward, gradient clipping, AdamW step, LR schedule, and for stage 2 the EMA update of
`core.train.make_ema`) on an Accelerator from `core.accel.make_accelerator`, with the stages' optimizers
(`vqvae.train.build_optimizer`, `maskgit.train.build_optimizer`), in-process and at the preset's batch size; stage
2's update is the joint generator + critic one. Data loading is left out: stage 1 reads a fixed batch of `shapes`
images, stage 2 random codes (the cost of a step does not depend on the code values). Peak memory is what the GPU
allocator saw (`max_memory_allocated`) or, on the CPU, the growth of the process's resident memory from before the
model was built (sampled every 2 ms, so a lower bound).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time

import torch

import maskgit.train
import vqvae.train
from common import PeakRSS, autocast, fmt, machine_line, markdown_table, median, pick_device, sync
from core.accel import make_accelerator
from core.data import make_shapes
from core.train import make_ema, update_step
from maskgit.config import MASKGIT_PRESETS
from maskgit.model import build_maskgit
from vqvae.config import VQ_PRESETS
from vqvae.model import VQVAE

CRITICS = ("none", "self", "separate")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda)")
    p.add_argument("--vq-preset", default="tiny", choices=sorted(VQ_PRESETS), help="stage-1 preset")
    p.add_argument("--maskgit-preset", default="tiny", choices=sorted(MASKGIT_PRESETS), help="stage-2 preset")
    p.add_argument("--critics", nargs="+", default=list(CRITICS), choices=CRITICS, help="stage-2 critics to time")
    p.add_argument("--steps", type=int, default=20, help="timed updates per row (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed updates first (k-means init, allocator, compile)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model, as --compile in the scripts")
    p.add_argument("--quick", action="store_true", help="small batches, few steps: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 3, 1
    return args


def memory_meter(device: torch.device):
    """Context manager with a `.delta` in bytes: GPU allocator peak, or CPU resident-memory growth."""
    if device.type != "cuda":
        return PeakRSS()

    class CudaPeak:
        def __enter__(self):
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
            return self

        def __exit__(self, *exc):
            sync(device)
            self.delta = torch.cuda.max_memory_allocated(device) - self.base

    return CudaPeak()


def prime(device: torch.device) -> None:
    """Run a conv and a linear layer forward and backward once, so that lazily loaded kernels and thread pools
    are not counted as the first row's memory."""
    conv, linear = torch.nn.Conv2d(3, 8, 3).to(device), torch.nn.Linear(8, 8).to(device)
    with autocast(device):
        out = linear(conv(torch.randn(2, 3, 8, 8, device=device)).mean((2, 3)))
    out.sum().backward()


def time_updates(update, device, args) -> list[float]:
    for _ in range(args.warmup):
        update()
    sync(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        update()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def timed_update(accelerator, model, optimizer, scheduler, batch, loss_fn, grad_clip: float, after_step=None):
    """The training scripts' update step on one fixed micro-batch (no accumulation), as a no-argument function."""

    def refuse(loss):
        return f"loss is {loss.item()}: the benchmark's update diverged"

    return lambda: update_step(accelerator, model, optimizer, scheduler, [batch], loss_fn, grad_clip=grad_clip,
                               skip_nonfinite=False, on_nonfinite=refuse, after_step=after_step)


def vq_row(args, accelerator) -> dict:
    """One stage-1 update as in train_vq.py: VQ-VAE loss, backward, clip, AdamW, LR schedule."""
    device = accelerator.device
    model_cfg, train_cfg = VQ_PRESETS[args.vq_preset]
    batch = 8 if args.quick else train_cfg.batch_size
    images, _ = make_shapes(batch, model_cfg.image_size)
    images = (images.float() / 127.5 - 1).to(device)  # (b, 3, S, S) in [-1, 1]
    with memory_meter(device) as mem:
        torch.manual_seed(0)
        model = VQVAE(model_cfg).train()
        optimizer, scheduler = vqvae.train.build_optimizer(model, train_cfg)
        forward = torch.compile(model) if args.compile else model
        forward, optimizer, scheduler = accelerator.prepare(forward, optimizer, scheduler)
        update = timed_update(accelerator, forward, optimizer, scheduler, images, lambda x: forward(x).losses,
                              train_cfg.grad_clip)
        times = time_updates(update, device, args)
    params = sum(p.numel() for p in model.parameters())
    accelerator.free_memory()
    return dict(stage=f"VQ-VAE `{args.vq_preset}`", variant=model_cfg.quantizer, batch=batch, params=params,
                step=median(times), memory=mem.delta)


def maskgit_row(args, accelerator, critic: str) -> dict:
    """One stage-2 update as in train_maskgit.py (joint generator + critic loss), with its EMA update."""
    device = accelerator.device
    model_cfg, train_cfg = MASKGIT_PRESETS[args.maskgit_preset]
    model_cfg = dataclasses.replace(model_cfg, critic=critic)
    vq_cfg = VQ_PRESETS[args.vq_preset][0]
    K, side = vq_cfg.effective_codebook_size, vq_cfg.image_size // vq_cfg.downsample
    batch = 8 if args.quick else train_cfg.batch_size
    num_classes = 10
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, K, (batch, side * side), generator=gen).to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    with memory_meter(device) as mem:
        torch.manual_seed(0)
        model = build_maskgit(model_cfg, codebook_size=K, grid=(side, side), num_classes=num_classes).to(device)
        model.train()
        ema = make_ema(model, train_cfg.ema_decay)
        optimizer, scheduler = maskgit.train.build_optimizer(model, train_cfg)
        forward = torch.compile(model) if args.compile else model
        forward, optimizer, scheduler = accelerator.prepare(forward, optimizer, scheduler)
        update = timed_update(accelerator, forward, optimizer, scheduler, (codes, labels), lambda b: forward(*b),
                              train_cfg.grad_clip,
                              after_step=(lambda: ema.update_parameters(model)) if ema is not None else None)
        times = time_updates(update, device, args)
    params = sum(p.numel() for p in model.parameters())
    accelerator.free_memory()
    return dict(stage=f"MaskGIT `{args.maskgit_preset}`", variant=f"critic {critic}", batch=batch, params=params,
                step=median(times), memory=mem.delta)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    prime(device)
    with tempfile.TemporaryDirectory(prefix="train_speed-") as tmp:
        # bf16 autocast on a GPU (what the cifar10 presets train with), fp32 on the CPU
        accelerator = make_accelerator(tmp, mixed_precision="bf16" if device.type == "cuda" else "no",
                                       cpu=device.type == "cpu")
        device = accelerator.device
        rows = [vq_row(args, accelerator)]
        for critic in args.critics:
            print(f"MaskGIT, critic {critic}", file=sys.stderr, flush=True)
            rows.append(maskgit_row(args, accelerator, critic))

    base = next((r for r in rows if r["variant"] == "critic none"), None)
    memory_kind = "GPU peak allocated" if device.type == "cuda" else "CPU peak RSS growth"
    headers = ["stage", "variant", "params", "batch", "steps/s", "images/s", "ms/step", f"{memory_kind}, MiB",
               "time vs critic none"]
    table = []
    for r in rows:
        rel = f"{r['step'] / base['step']:.2f}x" if base and r["stage"] == base["stage"] else "-"
        table.append([r["stage"], r["variant"], f"{r['params']:,}", r["batch"], fmt(1 / r["step"]),
                      fmt(r["batch"] / r["step"]), fmt(r["step"] * 1e3), fmt(r["memory"] / 2**20), rel])
    print("\n".join([
        "## Training speed (one optimizer update, `core.train.update_step`: forward, backward, clip, AdamW"
        + (", EMA" if base else "") + ")",
        "", machine_line(device) + ("; torch.compile" if args.compile else "")
        + ("; bf16 autocast" if device.type == "cuda" else "; fp32"), "",
        markdown_table(headers, table), "",
        f"Median of {args.steps} timed updates after {args.warmup} warm-up updates; data loading not included. Memory: "
        + ("torch.cuda.max_memory_allocated above the level before the model was built."
           if device.type == "cuda" else
           "growth of resident memory from before the model was built (model, optimizer state, activations; "
           "sampled every 2 ms)."),
        "",
    ]))


if __name__ == "__main__":
    main()
