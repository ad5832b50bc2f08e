"""Stage 2: train the masked token transformer on the code grids of a trained tokenizer.

    python train_maskgit.py --vq runs/vq --preset tiny --out runs/maskgit
    python train_maskgit.py --vq runs/vq --critic self --class-cond --out runs/maskgit-critic
    accelerate launch --multi_gpu --num_processes 2 train_maskgit.py --vq runs/vq --preset cifar10 --out runs/mg
    python train_maskgit.py --out runs/maskgit --resume      # continue an interrupted run
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from maskgit.config import MASKGIT_PRESETS, MaskGITConfig, MaskGITTrainConfig, check_configs
from maskgit.model import build_maskgit
from maskgit.token_cache import cache_key, encode_dataset, load_or_build
from vqvae import load_tokenizer
from vqvae.data import load_dataset, save_image_grid
from vqvae.training import (
    Checkpoints, MetricsLog, NonFiniteLossError, RunFolderError, StepBatchSampler, Throughput, TrainState,
    add_config_args, check_finite, fail, flat_hparams, format_config, lr_factor, make_accelerator,
    nonfinite_message, read_run_config, resolve_run_configs, save_weights, step_generator, write_run_config,
)

STAGE = "maskgit"
RAW_WEIGHTS, EMA_WEIGHTS = "model.safetensors", "ema.safetensors"
CRITIC_PARAMETERS = ("token_critic.", "critic_")  # name prefixes of the critic's own parameters
RESUMABLE_CHANGES = {"steps", "critic_steps", "eval_every", "sample_every", "save_every", "keep_last",
                     "num_workers", "num_eval_images", "num_sample_images", "sample_steps"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vq", help="stage-1 run folder (the tokenizer); recorded in this run's config")
    parser.add_argument("--data", help="'cifar10', 'shapes' or a folder of images (default: the tokenizer's data)")
    parser.add_argument("--data-root", help="where cifar-10-batches-py lives (default: the tokenizer's)")
    parser.add_argument("--preset", default="tiny", choices=sorted(MASKGIT_PRESETS), help="named model + training setup")
    parser.add_argument("--out", required=True, help="run folder (config, weights, metrics, samples, checkpoints)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue the run in --out from its latest intact checkpoint, or from a given one")
    parser.add_argument("--cache-dir", help="where encoded datasets are cached (default: VQ_RUN/token_cache)")
    parser.add_argument("--skip-nonfinite", action="store_true",
                        help="skip (and count) steps whose loss is NaN/inf instead of stopping the run")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    add_config_args(parser, MaskGITConfig, MaskGITTrainConfig)
    return parser.parse_args(argv)


def resolve_config(args) -> tuple[MaskGITConfig, MaskGITTrainConfig, dict]:
    """Model config, training config and data description: from the preset, or from the run when resuming."""
    model_cfg, train_cfg, saved = resolve_run_configs(
        args, stage=STAGE, config_classes=(MaskGITConfig, MaskGITTrainConfig), presets=MASKGIT_PRESETS,
        resumable=RESUMABLE_CHANGES)
    if saved:
        if args.vq and Path(args.vq).resolve() != Path(saved["data"]["vq_run"]):
            fail(f"--vq {args.vq} differs from the tokenizer this run was trained on ({saved['data']['vq_run']})")
        return model_cfg, train_cfg, saved["data"]
    if not args.vq:
        fail("--vq RUN_DIR is required: the stage-1 run folder written by train_vq.py")
    try:
        vq_config = read_run_config(args.vq, "vqvae")
        check_configs(model_cfg, train_cfg)
    except (RunFolderError, ValueError) as err:
        fail(str(err))
    data = {
        "vq_run": str(Path(args.vq).resolve()),
        "data": args.data or vq_config["data"]["data"],
        "data_root": args.data_root or vq_config["data"]["data_root"],
        "image_size": vq_config["model"]["image_size"],
        "preset": args.preset,
    }
    return model_cfg, train_cfg, data


def encoded_splits(accelerator, vq, data: dict, cache_dir: Path):
    """(train codes (N, 2, h, w), train labels, held-out codes (M, 1, h, w), held-out labels, class names).

    The main process encodes and caches; the others wait and read the cache. A cached split needs no images."""
    out = []
    for split, flips in (("train", True), ("test", False)):
        def build(split=split, flips=flips):
            dataset = load_dataset(data["data"], data["image_size"], split, root=data["data_root"])
            codes, labels = encode_dataset(vq, dataset, flips=flips, device=accelerator.device,
                                           progress=accelerator.is_main_process)
            return codes, labels, dataset.classes

        key = cache_key(data["vq_run"], data["data"], data["image_size"], split, data["data_root"], flips)
        with accelerator.main_process_first():
            codes, labels, classes = load_or_build(cache_dir, key, build)
        out += [codes, labels]
    return (*out, classes)


def phase_schedule(optimizer, cfg: MaskGITTrainConfig):
    """Warm-up + decay over the generator's `steps`, then afresh over `critic_steps` for a separate critic."""
    generator = lr_factor(cfg.lr_schedule, cfg.warmup_steps, cfg.steps)
    critic = lr_factor(cfg.lr_schedule, min(cfg.warmup_steps, cfg.critic_steps // 10), max(cfg.critic_steps, 1))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: generator(step) if step < cfg.steps else critic(step - cfg.steps))


def build_optimizer(model, cfg: MaskGITTrainConfig):
    """AdamW; weight decay on matrices only (not on norms, biases, or the tiny position scale)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    return optimizer, phase_schedule(optimizer, cfg)


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


@torch.no_grad()
def track_critic(ema, model) -> None:
    """In a critic-only phase the EMA copy follows the critic directly: averaging would keep its random start."""
    averaged = dict(ema.module.named_parameters())
    for name, param in model.named_parameters():
        if name.startswith(CRITIC_PARAMETERS):
            averaged[name].copy_(param)


def batch(codes, labels, sampler: StepBatchSampler, step: int, micro_step: int, seed: int, rank: int, device):
    """This process's micro-batch of step `step`: codes (b, h*w) in a random view (flipped or not), labels (b,)."""
    idx = torch.tensor(sampler.local_indices(step, micro_step))
    view = torch.randint(codes.shape[1], (len(idx),), generator=step_generator(seed, step, micro_step, rank))
    grid = codes[idx, view]  # (b, h, w)
    return grid.flatten(1).to(device, non_blocking=True), labels[idx].to(device, non_blocking=True)


@torch.no_grad()
def evaluate(accelerator, model, codes, labels, cfg: MaskGITTrainConfig, step: int) -> dict:
    """Held-out masked-token metrics at fixed random times, each process on its share, averaged over all."""
    count = min(cfg.num_eval_images, len(codes))
    with accelerator.split_between_processes(torch.arange(count), apply_padding=True) as mine:
        gen = torch.Generator(device=accelerator.device).manual_seed(1234 + accelerator.process_index)
        grids = codes[mine, 0].flatten(1).to(accelerator.device)
        metrics = model.evaluate(grids, labels[mine].to(accelerator.device), generator=gen)
    names = sorted(metrics)
    values = accelerator.reduce(torch.tensor([metrics[k] for k in names], device=accelerator.device), "mean")
    return {f"eval_{k}": v for k, v in zip(names, values.tolist())} | {"step": step}


@torch.no_grad()
def write_samples(model, vq, num_classes: int, cfg: MaskGITTrainConfig, path: Path, device) -> None:
    """A preview grid, one row per class when the model is conditional."""
    if num_classes:
        per_class = max(1, cfg.num_sample_images // num_classes)
        labels = torch.arange(num_classes, device=device).repeat_interleave(per_class)
    else:
        per_class, labels = 8, None
    gen = torch.Generator(device=device).manual_seed(0)
    count = len(labels) if labels is not None else cfg.num_sample_images
    codes = model.generate(batch_size=count, labels=labels, steps=cfg.sample_steps, generator=gen)
    images = vq.decode(codes.view(count, *vq.grid_size)).clamp(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(images.cpu(), path, nrow=per_class)


def main(argv=None) -> None:
    args = parse_args(argv)
    run_dir = Path(args.out)
    model_cfg, train_cfg, data = resolve_config(args)
    accelerator = make_accelerator(run_dir, mixed_precision=train_cfg.mixed_precision,
                                   grad_accum=train_cfg.grad_accum, cpu=args.cpu,
                                   find_unused_parameters=train_cfg.train_critic == "separate"
                                   and model_cfg.critic != "none")
    try:
        vq = load_tokenizer(data["vq_run"], device=accelerator.device)
        cache_dir = Path(args.cache_dir or Path(data["vq_run"]) / "token_cache")
        train_codes, train_labels, eval_codes, eval_labels, classes = encoded_splits(accelerator, vq, data, cache_dir)
    except (RunFolderError, OSError, ValueError) as err:
        fail(f"could not prepare the training codes: {err}")
    if model_cfg.class_cond and not classes:
        if args.class_cond:
            fail(f"--class-cond needs a labelled dataset (class subfolders), but {data['data']} is unlabelled: "
                 "pass --class-cond false")
        accelerator.print(f"{data['data']} is unlabelled: training an unconditional model")
        model_cfg = dataclasses.replace(model_cfg, class_cond=False)
    num_classes = len(classes) if model_cfg.class_cond else 0

    torch.manual_seed(train_cfg.seed)  # the same initial weights on every process
    model = build_maskgit(model_cfg, codebook_size=vq.codebook_size, grid=vq.grid_size, num_classes=num_classes)
    model.to(accelerator.device)
    # masks, condition dropout and critic temperatures come from the global RNG: one stream per process, or
    # every process would draw the same masks for its share of the batch (a resume restores each stream)
    torch.manual_seed(train_cfg.seed * 1_000_003 + accelerator.process_index)
    ema = (AveragedModel(model, multi_avg_fn=ema_with_warmup(train_cfg.ema_decay), use_buffers=True)
           if train_cfg.ema_decay > 0 else None)
    optimizer, scheduler = build_optimizer(model, train_cfg)
    forward_model = torch.compile(model) if train_cfg.compile else model
    forward_model, optimizer, scheduler = accelerator.prepare(forward_model, optimizer, scheduler)
    state = TrainState()
    accelerator.register_for_checkpointing(state, *([ema] if ema is not None else []))
    checkpoints = Checkpoints(run_dir, accelerator, train_cfg.keep_last)
    if args.resume:
        try:
            resumed = checkpoints.resume(args.resume)
        except RunFolderError as err:
            fail(str(err))
        accelerator.print(f"resumed from {resumed} at step {state.step}")
        MetricsLog(run_dir, accelerator).drop_after(state.step)

    total_steps = train_cfg.steps + train_cfg.critic_steps
    sampler = StepBatchSampler(len(train_codes), train_cfg.batch_size, seed=train_cfg.seed,
                               rank=accelerator.process_index, world_size=accelerator.num_processes,
                               grad_accum=train_cfg.grad_accum)
    meta = {"model": model_cfg, "train": train_cfg, "data": data, "classes": classes, "num_classes": num_classes,
            "codebook_size": vq.codebook_size, "grid": list(vq.grid_size)}
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run_dir, STAGE, **meta, step=state.step, num_processes=accelerator.num_processes)
    accelerator.print(format_config("model", model_cfg) + "\n" + format_config("train", train_cfg))
    accelerator.print(f"codes: {len(train_codes)} train grids (x2 views) / {len(eval_codes)} held-out, grid "
                      f"{vq.grid_size}, codebook {vq.codebook_size}, classes {num_classes}; "
                      f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; global batch "
                      f"{train_cfg.batch_size} = {accelerator.num_processes} processes x {train_cfg.grad_accum} "
                      f"accumulation x {sampler.micro}")
    accelerator.init_trackers("train_maskgit", config=flat_hparams(model=model_cfg, train=train_cfg))
    metrics = MetricsLog(run_dir, accelerator)

    def save() -> None:
        checkpoints.save(state.step)
        if accelerator.is_main_process:
            save_weights(model, run_dir / RAW_WEIGHTS)
            if ema is not None:
                save_weights(ema.module, run_dir / EMA_WEIGHTS)
            write_run_config(run_dir, STAGE, **meta, step=state.step, ema=ema is not None,
                             num_processes=accelerator.num_processes)

    speed = Throughput()
    progress = tqdm(total=total_steps, initial=state.step, desc="train_maskgit",
                    disable=not accelerator.is_main_process)
    forward_model.train()
    while state.step < total_steps:
        critic_phase = state.step >= train_cfg.steps  # "separate": critic-only updates after the generator's
        skipped = False
        for micro_step in range(train_cfg.grad_accum):
            codes, labels = batch(train_codes, train_labels, sampler, state.step, micro_step, train_cfg.seed,
                                  accelerator.process_index, accelerator.device)
            with accelerator.accumulate(forward_model):
                losses = forward_model(codes, labels, only_train_critic=critic_phase,
                                       only_train_generator=train_cfg.train_critic == "separate" and not critic_phase)
                if check_finite(losses.loss, accelerator):
                    accelerator.backward(losses.loss)
                elif args.skip_nonfinite:
                    skipped = True
                else:
                    raise NonFiniteLossError(nonfinite_message(losses.loss, state.step, checkpoints))
                if accelerator.sync_gradients:
                    if skipped:  # drop the whole update; weights, optimizer state and EMA stay as they were
                        optimizer.zero_grad(set_to_none=True)
                    else:
                        if train_cfg.grad_clip > 0:
                            accelerator.clip_grad_norm_(forward_model.parameters(), train_cfg.grad_clip)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        if ema is not None:
                            ema.update_parameters(model)
                            if critic_phase:
                                track_critic(ema, model)
            speed.add(codes.shape[0] * accelerator.num_processes)
        scheduler.step()
        state.step += 1
        state.images_seen += train_cfg.batch_size
        state.skipped_steps += int(skipped)
        progress.update(1)
        if state.step % 10 == 0:
            progress.set_postfix(loss=f"{losses.loss.item():.4f}")
        last = state.step == total_steps
        eval_model = ema.module if ema is not None else model
        if state.step % train_cfg.eval_every == 0 or last:
            record = {"step": state.step, "images_seen": state.images_seen, "global_batch": train_cfg.batch_size,
                      "lr": scheduler.get_last_lr()[0], "skipped_steps": state.skipped_steps, **speed.read()}
            for name, value in losses._asdict().items():
                if value is not None:
                    record[name] = accelerator.reduce(value.detach().float(), "mean").item()
            record.update(evaluate(accelerator, eval_model, eval_codes, eval_labels, train_cfg, state.step))
            metrics.write(record)
            accelerator.print(f"step {state.step}: held-out masked accuracy {record['eval_masked_acc']:.3f}, "
                              f"loss {record['eval_loss']:.3f}")
        if accelerator.is_main_process and (state.step % train_cfg.sample_every == 0 or last):
            write_samples(eval_model, vq, num_classes, train_cfg, run_dir / "samples" / f"step_{state.step:08d}.png",
                          accelerator.device)
        if state.step % train_cfg.save_every == 0 or last:
            save()
    progress.close()
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main()
    except NonFiniteLossError as err:
        raise SystemExit(f"error: {err}")
