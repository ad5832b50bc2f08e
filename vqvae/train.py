"""Stage 1's training layer: `train_vq.py`'s command line, its evaluation, and its loop.

    python train_vq.py --data shapes --preset tiny --out runs/vq
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.accel import make_accelerator
from core.checkpoints import Checkpoints, TrainState, start_or_resume
from core.cli import add_config_args, add_run_args, fail, format_config
from core.data import BUILTIN_DATASETS, load_dataset, random_hflip
from core.images import save_image_grid
from core.metrics_log import MetricsLog, Throughput, flat_hparams
from core.order import StepBatchSampler, step_generator
from core.runs import WEIGHTS_NAME, resolve_run_configs, save_weights, write_run_config
from core.train import NonFiniteLossError, adamw, lr_schedule, nonfinite_message, train_record, update_step

from . import STAGE
from .config import VQ_PRESETS, VQConfig, VQTrainConfig
from .metrics import codebook_stats, psnr
from .model import VQVAE


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train_vq.py", description="Stage 1: train the VQ-VAE tokenizer.")
    parser.add_argument("--data", default="shapes", help="'cifar10', 'shapes' (built in) or a folder of images")
    parser.add_argument("--data-root", default="./data", help="where cifar-10-batches-py lives or is downloaded")
    parser.add_argument("--preset", default="tiny", choices=sorted(VQ_PRESETS), help="named model + training setup")
    add_run_args(parser, "config, weights, metrics, checkpoints")
    add_config_args(parser, VQConfig, VQTrainConfig)
    return parser.parse_args(argv)


def resolve_config(args) -> tuple[VQConfig, VQTrainConfig, dict]:
    """Model config, training config and data description: from the preset, or from the run when resuming."""
    model_cfg, train_cfg, run = resolve_run_configs(args, stage=STAGE, config_classes=(VQConfig, VQTrainConfig),
                                                    presets=VQ_PRESETS)
    if run is not None:
        return model_cfg, train_cfg, run.data
    # a folder is recorded as an absolute path, so stage 2 and resumes work from any directory
    data = args.data if args.data in BUILTIN_DATASETS else str(Path(args.data).resolve())
    return model_cfg, train_cfg, {"data": data, "data_root": str(Path(args.data_root).resolve()),
                                  "preset": args.preset}


def build_optimizer(model, cfg: VQTrainConfig):
    """AdamW (weight decay on every parameter) with warm-up and the configured decay."""
    optimizer = adamw(model, cfg)
    return optimizer, lr_schedule(optimizer, cfg.lr_schedule, cfg.warmup_steps, cfg.steps)


@torch.no_grad()
def evaluate(accelerator, model, eval_set, num_images: int) -> tuple[dict, torch.Tensor]:
    """Held-out PSNR, codebook usage and perplexity, each process on its share, then gathered.

    Returns the metrics and a preview: up to 8 originals above their reconstructions, (16, 3, H, W)."""
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    count = min(num_images, len(eval_set))
    with accelerator.split_between_processes(list(range(count)), apply_padding=True) as mine:
        images = torch.stack([eval_set[i][0] for i in mine]).to(accelerator.device)
        recon, codes = [], []
        for chunk in images.split(256):
            with accelerator.autocast():
                out = model(chunk)
            recon.append(out.recon.float().clamp(-1, 1))
            codes.append(out.codes)
        recon, codes = torch.cat(recon), torch.cat(codes)
    images, recon, codes = (accelerator.gather(t)[:count] for t in (images, recon, codes))
    model.train(was_training)
    usage, perplexity = codebook_stats(codes, model.codebook_size)
    shown = min(8, count)
    return ({"psnr": psnr(recon, images), "codebook_usage": usage, "perplexity": perplexity, "num_images": count},
            torch.cat([images[:shown], recon[:shown]]).cpu())


def main(argv=None) -> None:
    args = parse_args(argv)
    run_dir = Path(args.out)
    model_cfg, train_cfg, data = resolve_config(args)
    accelerator = make_accelerator(run_dir, mixed_precision=train_cfg.mixed_precision,
                                   grad_accum=train_cfg.grad_accum, cpu=args.cpu)
    try:
        train_set = load_dataset(data["data"], model_cfg.image_size, "train", root=data["data_root"])
        eval_set = load_dataset(data["data"], model_cfg.image_size, "test", root=data["data_root"])
    except (OSError, ValueError, RuntimeError) as err:
        fail(f"could not load --data {data['data']}: {err}")

    torch.manual_seed(train_cfg.seed)  # weights and k-means init; data order has its own generator
    model = VQVAE(model_cfg)  # after Accelerator(): the codebook sync is decided at construction
    optimizer, scheduler = build_optimizer(model, train_cfg)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state, checkpoints = start_or_resume(accelerator, run_dir, train_cfg.keep_last, args.resume)
    sampler = StepBatchSampler(len(train_set), train_cfg.batch_size, seed=train_cfg.seed,
                               rank=accelerator.process_index, world_size=accelerator.num_processes,
                               grad_accum=train_cfg.grad_accum, start_step=state.step, total_steps=train_cfg.steps)

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run_dir, STAGE, model=model_cfg, train=train_cfg, data=data,
                         num_processes=accelerator.num_processes)
    accelerator.print(format_config("model", model_cfg) + "\n" + format_config("train", train_cfg))
    accelerator.print(f"data: {data['data']} ({len(train_set)} train / {len(eval_set)} held-out images); "
                      f"global batch {train_cfg.batch_size} = {accelerator.num_processes} processes x "
                      f"{train_cfg.grad_accum} accumulation x {sampler.micro}; codes {model_cfg.image_size}px -> "
                      f"{accelerator.unwrap_model(model).grid_size}")
    accelerator.init_trackers("train_vq", config=flat_hparams(model=model_cfg, train=train_cfg))
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=train_cfg.num_workers,
                                         pin_memory=accelerator.device.type == "cuda",
                                         persistent_workers=train_cfg.num_workers > 0,
                                         # its own generator: by default each `iter(loader)` draws from the global
                                         # RNG, which a resumed run would then use differently (dead-code re-seeding)
                                         generator=torch.Generator().manual_seed(train_cfg.seed))
    train(accelerator, model, optimizer, scheduler, iter(loader), eval_set, state, checkpoints,
          MetricsLog(run_dir, accelerator), train_cfg, run_dir, args.skip_nonfinite)
    accelerator.end_training()


def train(accelerator, model, optimizer, scheduler, batches, eval_set, state: TrainState, checkpoints: Checkpoints,
          metrics: MetricsLog, cfg: VQTrainConfig, run_dir: Path, skip_nonfinite: bool) -> None:
    """The loop: one update per step; evaluation, preview and checkpoint on their schedules."""
    rank, device = accelerator.process_index, accelerator.device

    def micro_batches(step: int):  # this process's images of update `step`, flipped by a per-step generator
        for micro_step in range(cfg.grad_accum):
            images, _ = next(batches)
            yield random_hflip(images, step_generator(cfg.seed, step, micro_step, rank)).to(device, non_blocking=True)

    speed = Throughput()
    progress = tqdm(total=cfg.steps, initial=state.step, desc="train_vq", disable=not accelerator.is_main_process)
    model.train()
    while state.step < cfg.steps:
        update = update_step(accelerator, model, optimizer, scheduler, micro_batches(state.step),
                             lambda images: model(images).losses, grad_clip=cfg.grad_clip,
                             skip_nonfinite=skip_nonfinite,
                             on_nonfinite=lambda loss: nonfinite_message(loss, state.step, checkpoints))
        speed.add(update.items * accelerator.num_processes)
        state.advance(cfg.batch_size, update.skipped)
        progress.update(1)
        if state.step % 10 == 0:
            progress.set_postfix(loss=f"{update.losses.total.item():.4f}")
        last = state.step == cfg.steps
        if state.step % cfg.eval_every == 0 or last:
            losses = update.losses
            record = train_record(accelerator, state, cfg, scheduler,
                                  {"loss": losses.total, "recon_loss": losses.recon}, speed)
            evaluation, preview = evaluate(accelerator, model, eval_set, cfg.num_eval_images)
            metrics.write(record | evaluation)
            if accelerator.is_main_process:
                save_image_grid(preview, run_dir / "reconstructions.png", nrow=len(preview) // 2)
            accelerator.print(f"step {state.step}: psnr {evaluation['psnr']:.2f} dB, codebook usage "
                              f"{evaluation['codebook_usage']:.1%}, perplexity {evaluation['perplexity']:.1f}")
        if state.step % cfg.save_every == 0 or last:
            checkpoints.save(state.step)
            if accelerator.is_main_process:  # the weights the tokenizer is loaded from
                save_weights(accelerator.unwrap_model(model), run_dir / WEIGHTS_NAME)
    progress.close()


def run_cli(argv=None) -> None:
    """`train_vq.py`: main() with a non-finite loss reported as one line, not a traceback."""
    try:
        main(argv)
    except NonFiniteLossError as err:
        raise SystemExit(f"error: {err}")
