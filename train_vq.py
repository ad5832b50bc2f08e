"""Stage 1: train the VQ-VAE tokenizer.

    python train_vq.py --data shapes --preset tiny --out runs/vq
    accelerate launch --multi_gpu --num_processes 2 train_vq.py --data cifar10 --preset cifar10 --out runs/vq
    python train_vq.py --out runs/vq --resume            # continue an interrupted run
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vqvae.config import VQ_PRESETS, VQConfig, VQTrainConfig
from vqvae.data import load_dataset, random_hflip, save_image_grid
from vqvae.metrics import codebook_stats, psnr
from vqvae.model import VQVAE
from vqvae.training import (
    Checkpoints, MetricsLog, NonFiniteLossError, RunFolderError, StepBatchSampler, Throughput, TrainState,
    add_config_args, check_finite, fail, flat_hparams, format_config, lr_schedule, make_accelerator,
    nonfinite_message, resolve_run_configs, save_weights, step_generator, write_run_config, WEIGHTS_NAME,
)

STAGE = "vqvae"
# Settings that may change when a run is resumed; anything else must match the run folder.
RESUMABLE_CHANGES = {"steps", "eval_every", "save_every", "keep_last", "num_workers", "num_eval_images"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="shapes", help="'cifar10', 'shapes' (built in) or a folder of images")
    parser.add_argument("--data-root", default="./data", help="where cifar-10-batches-py lives or is downloaded")
    parser.add_argument("--preset", default="tiny", choices=sorted(VQ_PRESETS), help="named model + training setup")
    parser.add_argument("--out", required=True, help="run folder (config, weights, metrics, checkpoints)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue the run in --out from its latest intact checkpoint, or from a given one")
    parser.add_argument("--skip-nonfinite", action="store_true",
                        help="skip (and count) steps whose loss is NaN/inf instead of stopping the run")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    add_config_args(parser, VQConfig, VQTrainConfig)
    return parser.parse_args(argv)


def resolve_config(args) -> tuple[VQConfig, VQTrainConfig, dict]:
    """Model config, training config and data description: from the preset, or from the run when resuming."""
    model_cfg, train_cfg, saved = resolve_run_configs(args, stage=STAGE, config_classes=(VQConfig, VQTrainConfig),
                                                      presets=VQ_PRESETS, resumable=RESUMABLE_CHANGES)
    if saved:
        return model_cfg, train_cfg, saved["data"]
    # a folder is recorded as an absolute path, so stage 2 and resumes work from any directory
    data = args.data if args.data in ("cifar10", "shapes") else str(Path(args.data).resolve())
    data = {"data": data, "data_root": str(Path(args.data_root).resolve()), "preset": args.preset}
    return model_cfg, train_cfg, data


def build_optimizer(model, cfg: VQTrainConfig):
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    return optimizer, lr_schedule(optimizer, cfg.lr_schedule, cfg.warmup_steps, cfg.steps)


@torch.no_grad()
def evaluate(accelerator, model, eval_set, cfg: VQTrainConfig, step: int, run_dir: Path) -> dict:
    """Held-out PSNR, codebook usage and perplexity, computed by every process on its share, then gathered."""
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    count = min(cfg.num_eval_images, len(eval_set))
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
    record = {"step": step, "psnr": float(psnr(recon, images)), "codebook_usage": usage,
              "perplexity": perplexity, "num_images": count}
    if accelerator.is_main_process:  # originals above their reconstructions
        shown = min(8, count)
        save_image_grid(torch.cat([images[:shown], recon[:shown]]).cpu(), run_dir / "reconstructions.png", nrow=shown)
    return record


def save(accelerator, model, checkpoints: Checkpoints, state: TrainState, run_dir: Path) -> None:
    """A resume checkpoint, then the exported weights the tokenizer is loaded from."""
    checkpoints.save(state.step)
    if accelerator.is_main_process:
        save_weights(accelerator.unwrap_model(model), run_dir / WEIGHTS_NAME)


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
    sampler = StepBatchSampler(len(train_set), train_cfg.batch_size, seed=train_cfg.seed,
                               rank=accelerator.process_index, world_size=accelerator.num_processes,
                               grad_accum=train_cfg.grad_accum, total_steps=train_cfg.steps)

    torch.manual_seed(train_cfg.seed)  # weights and k-means init; data order has its own generator
    model = VQVAE(model_cfg)  # after Accelerator(): the codebook sync is decided at construction
    optimizer, scheduler = build_optimizer(model, train_cfg)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    checkpoints = Checkpoints(run_dir, accelerator, train_cfg.keep_last)
    if args.resume:
        try:
            resumed = checkpoints.resume(args.resume)
        except RunFolderError as err:
            fail(str(err))
        accelerator.print(f"resumed from {resumed} at step {state.step}")
        MetricsLog(run_dir, accelerator).drop_after(state.step)
    sampler.start_step = state.step

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
    metrics = MetricsLog(run_dir, accelerator)

    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=train_cfg.num_workers,
                                         pin_memory=accelerator.device.type == "cuda",
                                         persistent_workers=train_cfg.num_workers > 0,
                                         # its own generator: by default each `iter(loader)` draws from the global
                                         # RNG, which a resumed run would then use differently (dead-code re-seeding)
                                         generator=torch.Generator().manual_seed(train_cfg.seed))
    train(accelerator, model, optimizer, scheduler, loader, eval_set, state, checkpoints, metrics,
          train_cfg, run_dir, args.skip_nonfinite)
    accelerator.end_training()


def train(accelerator, model, optimizer, scheduler, loader, eval_set, state, checkpoints, metrics,
          cfg: VQTrainConfig, run_dir: Path, skip_nonfinite: bool) -> None:
    speed = Throughput()
    progress = tqdm(total=cfg.steps, initial=state.step, desc="train_vq", disable=not accelerator.is_main_process)
    micro_step, window_bad = 0, False
    model.train()
    for images, _ in loader:
        gen = step_generator(cfg.seed, state.step, micro_step, accelerator.process_index)
        images = random_hflip(images, gen).to(accelerator.device, non_blocking=True)
        with accelerator.accumulate(model):
            # a training-mode forward moves the EMA codebook: a skipped step must put it back
            kept = {n: b.detach().clone() for n, b in model.named_buffers()} if skip_nonfinite else None
            losses = model(images).losses
            if check_finite(losses.total, accelerator):
                accelerator.backward(losses.total)
            elif skip_nonfinite:
                window_bad = True
                with torch.no_grad():
                    for name, buffer in model.named_buffers():
                        buffer.copy_(kept[name])
            else:
                raise NonFiniteLossError(nonfinite_message(losses.total, state.step, checkpoints))
            if accelerator.sync_gradients:
                if window_bad:  # drop the whole update; optimizer state and weights stay as they were
                    optimizer.zero_grad(set_to_none=True)
                else:
                    if cfg.grad_clip > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        micro_step += 1
        speed.add(images.shape[0] * accelerator.num_processes)
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        state.step += 1
        state.images_seen += cfg.batch_size
        state.skipped_steps += int(window_bad)
        micro_step, window_bad = 0, False
        progress.update(1)
        if state.step % 10 == 0:
            progress.set_postfix(loss=f"{losses.total.item():.4f}")
        last = state.step == cfg.steps
        if state.step % cfg.eval_every == 0 or last:
            record = {"step": state.step, "loss": accelerator.reduce(losses.total.detach(), "mean").item(),
                      "recon_loss": accelerator.reduce(losses.recon.detach(), "mean").item(),
                      "lr": scheduler.get_last_lr()[0], "images_seen": state.images_seen,
                      "skipped_steps": state.skipped_steps, "global_batch": cfg.batch_size, **speed.read()}
            record.update(evaluate(accelerator, model, eval_set, cfg, state.step, run_dir))
            metrics.write(record)
            accelerator.print(f"step {state.step}: psnr {record['psnr']:.2f} dB, codebook usage "
                              f"{record['codebook_usage']:.1%}, perplexity {record['perplexity']:.1f}")
        if state.step % cfg.save_every == 0 or last:
            save(accelerator, model, checkpoints, state, run_dir)
    progress.close()


if __name__ == "__main__":
    try:
        main()
    except NonFiniteLossError as err:
        raise SystemExit(f"error: {err}")
