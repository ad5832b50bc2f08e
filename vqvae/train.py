"""Stage 1's training layer: `train_vq.py`'s command line, its evaluation, and its loop.

    python train_vq.py --data shapes --preset tiny --out runs/vq
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.accel import make_accelerator
from core.checkpoints import Checkpoints, TrainState, start_or_resume
from core.cli import add_config_args, add_run_args, exit_on_clear_error, fail, format_config
from core.data import (DEFAULT_CROP_SCALE, add_data_args, as_float, canonical_data, load_dataset, loader_options,
                       random_hflip, train_loader, unreadable_images)
from core.images import images_per_batch, save_image_grid
from core.lock import run_locked
from core.metrics_log import MetricsLog, Throughput, flat_hparams
from core.order import StepBatchSampler, step_generator
from core.preempt import Preemption
from core.runs import WEIGHTS_NAME, note_dataset, resolve_run_configs, save_weights, write_run_config
from core.train import adamw, lr_schedule, nonfinite_message, train_record, update_step

from . import STAGE
from .config import VQ_PRESETS, VQConfig, VQTrainConfig
from .metrics import codebook_stats, psnr, rfid, ssim
from .model import VQVAE
from .objective import (Discriminator, generator_losses, load_perceptual, perceptual_if_present)
from .perceptual import PerceptualWeightsError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train_vq.py", description="Stage 1: train the VQ-VAE tokenizer.")
    parser.add_argument("--data", default="shapes", help="'cifar10', 'shapes' (built in), a folder of images or "
                        "hf:NAME_OR_PATH (Hugging Face datasets; docs/data.md)")
    parser.add_argument("--data-root", default="./data", help="where cifar-10-batches-py lives or is downloaded")
    parser.add_argument("--preset", default="tiny", choices=sorted(VQ_PRESETS), help="named model + training setup")
    add_run_args(parser, "config, weights, metrics, checkpoints")
    add_data_args(parser)
    add_config_args(parser, VQConfig, VQTrainConfig)
    args = parser.parse_args(argv)
    args.command = ["train_vq.py", *(sys.argv[1:] if argv is None else map(str, argv))]  # recorded in config.json
    return args


def resolve_config(args) -> tuple[VQConfig, VQTrainConfig, dict]:
    """Model config, training config and data description: from the preset, or from the run when resuming."""
    model_cfg, train_cfg, run = resolve_run_configs(args, stage=STAGE, config_classes=(VQConfig, VQTrainConfig),
                                                    presets=VQ_PRESETS)
    if run is not None:
        return model_cfg, train_cfg, run.data
    # a folder is recorded as an absolute path, so stage 2 and resumes work from any directory
    data = canonical_data(args.data)
    return model_cfg, train_cfg, {"data": data, "data_root": str(Path(args.data_root).resolve()),
                                  "preset": args.preset, "crop": args.crop or "center",
                                  "crop_scale": list(args.crop_scale or DEFAULT_CROP_SCALE),
                                  "command": args.command}  # the command that started the run (model card)


def build_optimizer(model, cfg: VQTrainConfig):
    """AdamW (weight decay on every parameter) with warm-up and the configured decay."""
    optimizer = adamw(model, cfg)
    return optimizer, lr_schedule(optimizer, cfg.lr_schedule, cfg.warmup_steps, cfg.steps)


@torch.no_grad()
def evaluate(accelerator, model, eval_set, num_images: int, perceptual=None, num_rfid: int = 0) -> tuple[dict,
                                                                                                     torch.Tensor]:
    """Held-out reconstruction metrics, each process on its share, then gathered: PSNR, SSIM, codebook usage and
    perplexity; LPIPS with `perceptual`; rFID on `num_rfid` images when the Inception weights are cached.

    Returns the metrics and a preview: up to 8 originals above their reconstructions, (16, 3, H, W)."""
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    count = min(max(num_images, num_rfid), len(eval_set))
    with accelerator.split_between_processes(list(range(count)), apply_padding=True) as mine:
        images = torch.stack([eval_set[i][0] for i in mine]).to(accelerator.device)
        recon, codes = [], []
        for chunk in images.split(images_per_batch(images.shape[-1])):  # activation memory grows with the area
            with accelerator.autocast():
                out = model(chunk)
            recon.append(out.recon.float().clamp(-1, 1))
            codes.append(out.codes)
        recon, codes = torch.cat(recon), torch.cat(codes)
    images, recon, codes = (accelerator.gather(t)[:count] for t in (images, recon, codes))
    model.train(was_training)
    usage, perplexity = codebook_stats(codes, model.codebook_size)
    record = {"psnr": psnr(recon, images), "ssim": ssim(recon, images), "codebook_usage": usage,
              "perplexity": perplexity, "num_images": count}
    if perceptual is not None:
        record["lpips"] = torch.cat([perceptual(r, i, reduction="none") for r, i in
                                     zip(recon.split(64), images.split(64))]).mean().item()
    if num_rfid and accelerator.is_main_process:
        record["rfid"] = rfid(images[:num_rfid], recon[:num_rfid])
    shown = min(8, count)
    return record, torch.cat([images[:shown], recon[:shown]]).cpu()


def build_objective(accelerator, cfg: VQTrainConfig):
    """(LPIPS or None, discriminator or None, its optimizer and LR schedule) as the config asks.

    LPIPS for training needs its weights (downloaded once when online, or --perceptual-weights); for evaluation it
    is used whenever its weights are already on this machine."""
    try:
        perceptual = load_perceptual(cfg.perceptual_weights) if cfg.perceptual_weight > 0 else \
            perceptual_if_present(cfg.perceptual_weights)
    except PerceptualWeightsError as err:
        fail(f"--perceptual-weight {cfg.perceptual_weight} needs the LPIPS weights: {err}")
    if perceptual is not None:
        perceptual.to(accelerator.device)
    if not cfg.uses_gan:
        return perceptual, None, None, None
    discriminator = Discriminator(cfg)
    d_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=cfg.disc_lr or cfg.lr, betas=cfg.betas,
                                    weight_decay=cfg.weight_decay)
    # its own warm-up and decay, over the steps it trains (from disc_start on)
    d_scheduler = lr_schedule(d_optimizer, cfg.lr_schedule, cfg.warmup_steps, max(1, cfg.steps - cfg.disc_start))
    return perceptual, discriminator, d_optimizer, d_scheduler


def main(argv=None) -> None:
    run_locked(parse_args(argv), train_main)  # one run per folder (core.lock)


def train_main(args) -> None:
    run_dir = Path(args.out)
    model_cfg, train_cfg, data = resolve_config(args)
    accelerator = make_accelerator(run_dir, mixed_precision=train_cfg.mixed_precision,
                                   grad_accum=train_cfg.grad_accum, cpu=args.cpu)
    try:
        options = loader_options(args) | {"progress": accelerator.is_main_process}
        train_set = load_dataset(data["data"], model_cfg.image_size, "train", root=data["data_root"],
                                 crop=data.get("crop", "center"),
                                 crop_scale=tuple(data.get("crop_scale", DEFAULT_CROP_SCALE)), **options)
        eval_set = load_dataset(data["data"], model_cfg.image_size, "test", root=data["data_root"], **options)
    except (OSError, ValueError, RuntimeError) as err:
        fail(f"could not load --data {data['data']}: {err}")
    data = note_dataset(data, model_cfg.image_size, resumed=bool(args.resume), accelerator=accelerator)

    torch.manual_seed(train_cfg.seed)  # weights and k-means init; data order has its own generator
    model = VQVAE(model_cfg)  # after Accelerator(): the codebook sync is decided at construction
    optimizer, scheduler = build_optimizer(model, train_cfg)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    perceptual, *gan = build_objective(accelerator, train_cfg)
    if gan[0] is not None:  # discriminator, its optimizer and schedule: prepared (and checkpointed) like the model
        gan = accelerator.prepare(*gan)
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
    loader = train_loader(train_set, sampler, num_workers=train_cfg.num_workers,  # decoding in worker processes
                          pin_memory=accelerator.device.type == "cuda", seed=train_cfg.seed)
    with Preemption(accelerator) as preemption:  # SIGTERM/SIGINT: checkpoint after this step, then stop
        train(accelerator, (model, optimizer, scheduler), gan, perceptual, iter(loader), eval_set, state,
              checkpoints, MetricsLog(run_dir, accelerator), train_cfg, run_dir, args.skip_nonfinite, preemption)
    accelerator.end_training()


def train(accelerator, tokenizer, gan, perceptual, batches, eval_set, state: TrainState, checkpoints: Checkpoints,
          metrics: MetricsLog, cfg: VQTrainConfig, run_dir: Path, skip_nonfinite: bool,
          preemption: Preemption | None = None) -> None:
    """The loop: one tokenizer update per step, then (from `disc_start` on) one discriminator update on the same
    images and their reconstructions; evaluation, preview and checkpoint on their schedules."""
    model, optimizer, scheduler = tokenizer
    discriminator, d_optimizer, d_scheduler = gan
    rank, device = accelerator.process_index, accelerator.device
    raw, raw_disc = accelerator.unwrap_model(model), discriminator and accelerator.unwrap_model(discriminator)

    def micro_batches(step: int):  # this process's images of update `step`, flipped by a per-step generator
        for micro_step in range(cfg.grad_accum):
            images, _ = next(batches)
            images = random_hflip(images, step_generator(cfg.seed, step, micro_step, rank))
            yield as_float(images.to(device, non_blocking=True))  # uint8 from the loader: converted on the device

    def tokenizer_loss(images):
        out = model(images)
        seen.append((images, out.recon.detach()))  # what the discriminator then learns on
        with accelerator.autocast():
            return generator_losses(out, images, cfg, step=state.step, perceptual=perceptual,
                                    discriminator=raw_disc, last_layer=raw.last_layer)

    speed = Throughput()
    progress = tqdm(total=cfg.steps, initial=state.step, desc="train_vq", disable=not accelerator.is_main_process)
    model.train()
    while state.step < cfg.steps:
        seen = []
        on_nonfinite = lambda loss: nonfinite_message(loss, state.step, checkpoints)  # noqa: E731
        update = update_step(accelerator, model, optimizer, scheduler, micro_batches(state.step), tokenizer_loss,
                             grad_clip=cfg.grad_clip, skip_nonfinite=skip_nonfinite, on_nonfinite=on_nonfinite)
        d_losses = None
        if discriminator is not None and state.step >= cfg.disc_start:
            d_update = update_step(accelerator, discriminator, d_optimizer, d_scheduler, seen,
                                   lambda pair: discriminator(*pair), grad_clip=cfg.grad_clip,
                                   skip_nonfinite=skip_nonfinite, on_nonfinite=on_nonfinite)
            d_losses = d_update.losses
        speed.add(update.items * accelerator.num_processes)
        state.advance(cfg.batch_size, update.skipped)
        progress.update(1)
        if state.step % 10 == 0:
            progress.set_postfix(loss=f"{update.losses.total.item():.4f}")
        last = state.step == cfg.steps
        if state.step % cfg.eval_every == 0 or last:
            losses = update.losses._asdict() | {"loss": update.losses.total, "recon_loss": update.losses.recon}
            del losses["total"], losses["recon"]
            if d_losses is not None:
                losses |= {f"disc_{name}": value for name, value in d_losses._asdict().items()}
            record = train_record(accelerator, state, cfg, scheduler, losses, speed)
            evaluation, preview = evaluate(accelerator, model, eval_set, cfg.num_eval_images, perceptual,
                                           cfg.num_rfid_images)
            metrics.write(record | evaluation | unreadable_images(accelerator))
            if accelerator.is_main_process:
                save_image_grid(preview, run_dir / "reconstructions.png", nrow=len(preview) // 2)
            accelerator.print(f"step {state.step}: psnr {evaluation['psnr']:.2f} dB, ssim {evaluation['ssim']:.3f}, "
                              f"codebook usage {evaluation['codebook_usage']:.1%}, perplexity "
                              f"{evaluation['perplexity']:.1f}" + "".join(
                                  f", {k} {evaluation[k]:.3f}" for k in ("lpips", "rfid")
                                  if evaluation.get(k) is not None))
        stop = preemption is not None and preemption.agreed() and not last  # the same on every process
        if state.step % cfg.save_every == 0 or last or stop:
            saved = checkpoints.save(state.step)
            if accelerator.is_main_process:  # the weights the tokenizer is loaded from
                save_weights(raw, run_dir / WEIGHTS_NAME)
        if stop:
            preemption.exit(state.step, saved)
    progress.close()


def run_cli(argv=None) -> None:
    """`train_vq.py`: main() with a clear error (a non-finite loss, a full disk) as one line, not a traceback."""
    exit_on_clear_error(main, argv)
