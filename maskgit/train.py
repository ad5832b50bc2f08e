"""Stage 2's training layer: `train_maskgit.py`'s command line, the cached code grids, evaluation, previews, the loop.

    python train_maskgit.py --vq runs/vq --preset tiny --out runs/maskgit
"""

from __future__ import annotations

import argparse
import sys
import dataclasses
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.accel import make_accelerator
from core.checkpoints import Checkpoints, TrainState, start_or_resume
from core.cli import add_config_args, add_run_args, exit_on_clear_error, fail, format_config
from core.data import add_data_args, canonical_data, loader_options
from core.images import save_image_grid
from core.lock import run_locked
from core.metrics_log import MetricsLog, Throughput, flat_hparams
from core.order import StepBatchSampler, step_generator
from core.preempt import Preemption
from core.runs import (EMA_WEIGHTS_NAME, WEIGHTS_NAME, Run, RunFolderError, check_resumed_classes, note_dataset,
                       resolve_run_configs, save_weights, write_run_config)
from core.train import adamw, lr_factor, make_ema, nonfinite_message, train_record, update_step
from vqvae import STAGE as TOKENIZER_STAGE
from vqvae.tokenizer import TokenizerSourceError, load_tokenizer_from

from . import STAGE, open_tokenizer
from .config import MASKGIT_PRESETS, MaskGITConfig, MaskGITTrainConfig, check_configs
from .model import build_maskgit
from .token_cache import TOKEN_VIEWS
from .token_cache import encoded_splits as encode_splits
from .tune import CLASSIFIER_GRIDS, describe, tune_sampling

CRITIC_PARAMETERS = ("token_critic.", "critic_")  # name prefixes of the critic's own parameters


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train_maskgit.py", description="Stage 2: train the masked token "
                                     "transformer on the code grids of a trained tokenizer.")
    parser.add_argument("--vq", help="the tokenizer: a stage-1 run folder, a diffusers VQModel folder, a LlamaGen VQ "
                        "checkpoint (.pt), or a Hugging Face Hub repo id holding one (docs/tokenizers.md)")
    parser.add_argument("--vq-subfolder", help="with --vq: the subfolder holding the model (aMUSEd: vqvae)")
    parser.add_argument("--vq-revision", help="with a Hub --vq: branch, tag or commit (recorded as the commit used)")
    parser.add_argument("--vq-kind", choices=("own", "diffusers", "llamagen"), help="skip detecting the format")
    parser.add_argument("--vq-pixel-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="diffusers VQModel: the pixel range it was trained on (default -1 1; aMUSEd: 0 1)")
    parser.add_argument("--image-size", type=int, help="training resolution for a published tokenizer (our "
                        "tokenizers fix their own); must tile into the tokenizer's grid")
    parser.add_argument("--data", help="'cifar10', 'shapes', a folder of images or hf:NAME_OR_PATH (docs/data.md; "
                        "default: the tokenizer's data)")
    parser.add_argument("--data-root", help="where cifar-10-batches-py lives (default: the tokenizer's)")
    parser.add_argument("--preset", default="tiny", choices=sorted(MASKGIT_PRESETS),
                        help="named model + training setup")
    add_run_args(parser, "config, weights, metrics, samples, checkpoints")
    parser.add_argument("--cache-dir", help="where encoded datasets are cached (default: VQ_RUN/token_cache for our "
                        "tokenizers, OUT/token_cache for published ones)")
    parser.add_argument("--token-views", choices=TOKEN_VIEWS, default=None,
                        help="views of each training image in the token cache: 'flip' (as given + mirrored, the "
                             "default), 'none', or 'tencrop' (LlamaGen's ten crops); fixed for a run")
    add_data_args(parser, crop=False)
    add_config_args(parser, MaskGITConfig, MaskGITTrainConfig)
    args = parser.parse_args(argv)
    args.command = ["train_maskgit.py", *(sys.argv[1:] if argv is None else map(str, argv))]  # recorded in config.json
    return args


def resolve_config(args) -> tuple[MaskGITConfig, MaskGITTrainConfig, dict]:
    """Model config, training config and data description: from the preset, or from the run when resuming.

    The data description records the tokenizer: `vq_run` (our stage-1 folder) or `tokenizer` (a published one's
    source record, pinned to the Hub commit and the weights' sha256)."""
    model_cfg, train_cfg, run = resolve_run_configs(
        args, stage=STAGE, config_classes=(MaskGITConfig, MaskGITTrainConfig), presets=MASKGIT_PRESETS)
    if run is not None:
        if args.vq and "vq_run" in run.data and Path(args.vq).resolve() != run.tokenizer_path:
            fail(f"--vq {args.vq} differs from the tokenizer this run was trained on ({run.tokenizer_path})")
        return model_cfg, train_cfg, run.data
    if not args.vq:
        fail("--vq is required: a stage-1 run folder written by train_vq.py, or a published tokenizer "
             "(docs/tokenizers.md)")
    try:
        check_configs(model_cfg, train_cfg)
        own = args.vq_kind in (None, "own") and not args.vq_subfolder and is_stage1_run(Path(args.vq))
        if own:
            tokenizer_run = Run.open(args.vq, TOKENIZER_STAGE)
            if args.image_size not in (None, tokenizer_run.image_size):
                fail(f"--image-size {args.image_size}: the tokenizer in {args.vq} was trained at "
                     f"{tokenizer_run.image_size} px and its codes are made at that size")
            source = {"vq_run": str(Path(args.vq).resolve()), "data": tokenizer_run.data["data"],
                      "data_root": tokenizer_run.data["data_root"], "image_size": tokenizer_run.image_size}
        else:
            source = published_tokenizer(args)
        data = {
            **source,
            "data": canonical_data(args.data) if args.data else source["data"],
            "data_root": args.data_root or source["data_root"],
            "preset": args.preset,
            "token_views": args.token_views or "flip",
            "command": args.command,  # the command that started the run (model card)
        }
    except (RunFolderError, ValueError, KeyError) as err:
        fail(str(err))
    return model_cfg, train_cfg, data


def is_stage1_run(path: Path) -> bool:
    """A folder whose config.json says it is one of our stage-1 runs (anything else goes to the tokenizer loader)."""
    try:
        return json.loads((path / "config.json").read_text()).get("stage") == TOKENIZER_STAGE
    except (OSError, ValueError, AttributeError):
        return False


def published_tokenizer(args) -> dict:
    """The data description of a run on a published tokenizer, checked before any work: it loads, its grid tiles
    --image-size, and --data is given (a published tokenizer has no dataset of its own)."""
    try:
        tokenizer = load_tokenizer_from(args.vq, subfolder=args.vq_subfolder, revision=args.vq_revision,
                                        kind=args.vq_kind, pixel_range=args.vq_pixel_range)
    except TokenizerSourceError as err:
        fail(f"--vq {args.vq}: {err}")
    if not args.data:
        fail(f"--data is required with a published tokenizer ({args.vq}): the images to train on")
    if not args.image_size:
        fail(f"--image-size is required with a published tokenizer ({args.vq}): e.g. 256 for ImageNet 256")
    try:
        tokenizer.grid_for(args.image_size)
    except ValueError as err:
        fail(f"--image-size {args.image_size}: {err}")
    return {"tokenizer": tokenizer.source, "data": None, "data_root": "./data", "image_size": args.image_size}


def encoded_splits(accelerator, vq, data: dict, cache_dir: Path, num_workers: int = 0, options: dict | None = None):
    """(train codes (N, V, h, w), train labels, held-out codes (M, 1, h, w), held-out labels, class names).

    Every process encodes its shards of a split that is not cached yet (maskgit.token_cache); the codes come
    back memory-mapped in their stored integer type. A cached split needs no images."""
    return encode_splits(accelerator, vq, data, cache_dir, views=data.get("token_views", "flip"),
                         num_workers=num_workers, loader_options=options)


def phase_schedule(optimizer, cfg: MaskGITTrainConfig):
    """Warm-up + decay over the generator's `steps`, then afresh over `critic_steps` for a separate critic."""
    generator = lr_factor(cfg.lr_schedule, cfg.warmup_steps, cfg.steps)
    critic = lr_factor(cfg.lr_schedule, min(cfg.warmup_steps, cfg.critic_steps // 10), max(cfg.critic_steps, 1))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: generator(step) if step < cfg.steps else critic(step - cfg.steps))


def build_optimizer(model, cfg: MaskGITTrainConfig):
    """AdamW; weight decay on matrices only (not on norms, biases, or the tiny position scale)."""
    optimizer = adamw(model, cfg, decay=lambda p: p.ndim >= 2)
    return optimizer, phase_schedule(optimizer, cfg)


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
    grid = codes[idx, view]  # (b, h, w), in the cache's integer type: widened per batch, never on the host
    return grid.flatten(1).to(device, non_blocking=True).long(), labels[idx].to(device, non_blocking=True)


@torch.no_grad()
def evaluate(accelerator, model, codes, labels, num_images: int) -> dict:
    """Held-out masked-token metrics at fixed random times, each process on its share, averaged over all."""
    count = min(num_images, len(codes))
    with accelerator.split_between_processes(torch.arange(count), apply_padding=True) as mine:
        gen = torch.Generator(device=accelerator.device).manual_seed(1234 + accelerator.process_index)
        grids = codes[mine, 0].flatten(1).to(accelerator.device).long()
        metrics = model.evaluate(grids, labels[mine].to(accelerator.device), generator=gen)
    names = sorted(metrics)
    values = accelerator.reduce(torch.tensor([metrics[k] for k in names], device=accelerator.device), "mean")
    return {f"eval_{k}": v for k, v in zip(names, values.tolist())}


@torch.no_grad()
def preview(model, vq, num_classes: int, num_images: int, steps: int, device) -> tuple[torch.Tensor, int]:
    """Preview samples (b, 3, H, W) in [-1, 1] with a fixed seed, and the row length: one row per class."""
    if num_classes:
        per_class = max(1, num_images // num_classes)
        labels = torch.arange(num_classes, device=device).repeat_interleave(per_class)
    else:
        per_class, labels = 8, None
    count = len(labels) if labels is not None else num_images
    codes = model.generate(batch_size=count, labels=labels, steps=steps,
                           generator=torch.Generator(device=device).manual_seed(0))
    return vq.decode(codes.view(count, *model.grid)).clamp(-1, 1), per_class


def main(argv=None) -> None:
    run_locked(parse_args(argv), train_main)  # one run per folder (core.lock)


def train_main(args) -> None:
    run_dir = Path(args.out)
    model_cfg, train_cfg, data = resolve_config(args)
    accelerator = make_accelerator(run_dir, mixed_precision=train_cfg.mixed_precision,
                                   grad_accum=train_cfg.grad_accum, cpu=args.cpu,
                                   find_unused_parameters=train_cfg.train_critic == "separate"
                                   and model_cfg.critic != "none")
    try:
        vq = open_tokenizer(Run(run_dir, {"stage": STAGE, "data": data}), device=accelerator.device)
        grid = vq.grid_for(data["image_size"])
        cache_dir = Path(args.cache_dir or (Path(data["vq_run"]) if "vq_run" in data else run_dir) / "token_cache")
        train_codes, train_labels, eval_codes, eval_labels, classes = encoded_splits(
            accelerator, vq, data, cache_dir, train_cfg.num_workers, loader_options(args))
    except (RunFolderError, OSError, ValueError) as err:
        fail(f"could not prepare the training codes: {err}")
    data = note_dataset(data, data["image_size"], resumed=bool(args.resume), accelerator=accelerator)
    if model_cfg.class_cond and not classes:
        if args.class_cond:
            fail(f"--class-cond needs a labelled dataset (class subfolders), but {data['data']} is unlabelled: "
                 "pass --class-cond false")
        accelerator.print(f"{data['data']} is unlabelled: training an unconditional model")
        model_cfg = dataclasses.replace(model_cfg, class_cond=False)
    num_classes = len(classes) if model_cfg.class_cond else 0
    if args.resume:
        check_resumed_classes(run_dir, STAGE, classes, num_classes)

    torch.manual_seed(train_cfg.seed)  # the same initial weights on every process
    model = build_maskgit(model_cfg, codebook_size=vq.codebook_size, grid=grid, num_classes=num_classes)
    model.to(accelerator.device)
    # masks, condition dropout and critic temperatures come from the global RNG: one stream per process, or
    # every process would draw the same masks for its share of the batch (a resume restores each stream)
    torch.manual_seed(train_cfg.seed * 1_000_003 + accelerator.process_index)
    ema = make_ema(model, train_cfg.ema_decay)
    optimizer, scheduler = build_optimizer(model, train_cfg)
    forward_model = torch.compile(model) if train_cfg.compile else model
    forward_model, optimizer, scheduler = accelerator.prepare(forward_model, optimizer, scheduler)
    state, checkpoints = start_or_resume(accelerator, run_dir, train_cfg.keep_last, args.resume, ema=ema)

    sampler = StepBatchSampler(len(train_codes), train_cfg.batch_size, seed=train_cfg.seed,
                               rank=accelerator.process_index, world_size=accelerator.num_processes,
                               grad_accum=train_cfg.grad_accum)
    meta = {"model": model_cfg, "train": train_cfg, "data": data, "classes": classes, "num_classes": num_classes,
            "codebook_size": vq.codebook_size, "grid": list(grid), "ema": ema is not None,
            "num_processes": accelerator.num_processes}
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run_dir, STAGE, **meta, step=state.step)
    accelerator.print(format_config("model", model_cfg) + "\n" + format_config("train", train_cfg))
    accelerator.print(f"codes: {len(train_codes)} train grids (x{train_codes.shape[1]} views) / {len(eval_codes)} "
                      f"held-out, grid "
                      f"{grid}, codebook {vq.codebook_size}, classes {num_classes}; "
                      f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; global batch "
                      f"{train_cfg.batch_size} = {accelerator.num_processes} processes x {train_cfg.grad_accum} "
                      f"accumulation x {sampler.micro}")
    accelerator.init_trackers("train_maskgit", config=flat_hparams(model=model_cfg, train=train_cfg))
    data_for = lambda step, micro_step: batch(train_codes, train_labels, sampler, step, micro_step,  # noqa: E731
                                              train_cfg.seed, accelerator.process_index, accelerator.device)
    with Preemption(accelerator) as preemption:  # SIGTERM/SIGINT: checkpoint after this step, then stop
        train(accelerator, model, forward_model, ema, optimizer, scheduler, data_for, (eval_codes, eval_labels), vq,
              state, checkpoints, MetricsLog(run_dir, accelerator), train_cfg, run_dir, meta, args.skip_nonfinite,
              preemption, train_grids=(train_codes, train_labels))
    accelerator.end_training()


def train(accelerator, model, forward_model, ema, optimizer, scheduler, data_for, held_out, vq, state: TrainState,
          checkpoints: Checkpoints, metrics: MetricsLog, cfg: MaskGITTrainConfig, run_dir: Path, meta: dict,
          skip_nonfinite: bool, preemption: Preemption | None = None, train_grids=None) -> None:
    """The loop: one update per step (generator, then a separate critic's phase); eval, previews, checkpoints;
    at the end the sampling defaults (train_grids: the training (codes, labels), for their class-fidelity
    classifier)."""
    speed = Throughput()
    progress = tqdm(total=cfg.total_steps, initial=state.step, desc="train_maskgit",
                    disable=not accelerator.is_main_process)
    forward_model.train()
    while state.step < cfg.total_steps:
        critic_phase = state.step >= cfg.steps  # "separate": critic-only updates after the generator's
        generator_only = cfg.train_critic == "separate" and not critic_phase

        def after_step():
            if ema is not None:
                ema.update_parameters(model)
                if critic_phase:
                    track_critic(ema, model)

        update = update_step(accelerator, forward_model, optimizer, scheduler,
                             (data_for(state.step, m) for m in range(cfg.grad_accum)),
                             lambda b: forward_model(*b, only_train_critic=critic_phase,
                                                     only_train_generator=generator_only),
                             grad_clip=cfg.grad_clip, skip_nonfinite=skip_nonfinite, after_step=after_step,
                             on_nonfinite=lambda loss: nonfinite_message(loss, state.step, checkpoints))
        speed.add(update.items * accelerator.num_processes)
        state.advance(cfg.batch_size, update.skipped)
        progress.update(1)
        if state.step % 10 == 0:
            progress.set_postfix(loss=f"{update.losses.loss.item():.4f}")
        last = state.step == cfg.total_steps
        eval_model = ema.module if ema is not None else model
        if state.step % cfg.eval_every == 0 or last:
            record = train_record(accelerator, state, cfg, scheduler, update.losses._asdict(), speed)
            record |= evaluate(accelerator, eval_model, *held_out, cfg.num_eval_images)
            metrics.write(record)
            accelerator.print(f"step {state.step}: held-out masked accuracy {record['eval_masked_acc']:.3f}, "
                              f"loss {record['eval_loss']:.3f}")
        if accelerator.is_main_process and (state.step % cfg.sample_every == 0 or last):
            images, per_row = preview(eval_model, vq, meta["num_classes"], cfg.num_sample_images, cfg.sample_steps,
                                      accelerator.device)
            (run_dir / "samples").mkdir(parents=True, exist_ok=True)
            save_image_grid(images, run_dir / "samples" / f"step_{state.step:08d}.png", nrow=per_row)
        stop = preemption is not None and preemption.agreed() and not last  # the same on every process
        if state.step % cfg.save_every == 0 or last or stop:
            saved = checkpoints.save(state.step)
            if accelerator.is_main_process:
                save_weights(model, run_dir / WEIGHTS_NAME)
                if ema is not None:
                    save_weights(ema.module, run_dir / EMA_WEIGHTS_NAME)
                write_run_config(run_dir, STAGE, **meta, step=state.step)
        if stop:
            preemption.exit(state.step, saved)
    progress.close()
    if cfg.tune_sampling:
        record_sampling_defaults(accelerator, ema.module if ema is not None else model, vq, held_out, cfg, run_dir,
                                 meta, state.step, train_grids)


def record_sampling_defaults(accelerator, model, vq, held_out, cfg: MaskGITTrainConfig, run_dir: Path, meta: dict,
                             step: int, train_grids=None) -> None:
    """Score cfg.tune_cfg x tune_temperatures x tune_choice_temperatures x tune_remask on held-out data (maskgit.tune,
    main process) and store the best in config.json["sampling"], where sample.py finds its defaults. The class
    fidelity classifier learns from a seeded pick of CLASSIFIER_GRIDS training grids (as given, not mirrored)."""
    if accelerator.is_main_process:
        codes, labels = held_out
        count = min(cfg.num_eval_images, len(codes))
        grids = grid_labels = None
        if train_grids is not None and labels is not None and train_grids[1] is not None:
            all_codes, all_labels = train_grids
            chosen = torch.randperm(len(all_codes), generator=torch.Generator().manual_seed(cfg.seed))
            chosen = chosen[:CLASSIFIER_GRIDS].sort().values
            grids, grid_labels = all_codes[chosen, 0].flatten(1).long(), all_labels[chosen].long()
        result = tune_sampling(model, vq, codes[:count, 0].flatten(1).long(),
                               None if labels is None else labels[:count].long(), cfgs=cfg.tune_cfg,
                               temperatures=cfg.tune_temperatures,
                               choice_temperatures=cfg.tune_choice_temperatures, remasks=cfg.tune_remask,
                               num_samples=cfg.tune_samples,
                               steps=cfg.sample_steps, seed=cfg.seed, train_codes=grids, train_labels=grid_labels)
        accelerator.print(describe(result))
        meta["sampling"] = result
        write_run_config(run_dir, STAGE, **meta, step=step)
    accelerator.wait_for_everyone()


def run_cli(argv=None) -> None:
    """`train_maskgit.py`: main() with a clear error (a non-finite loss, a full disk) as one line, not a traceback."""
    exit_on_clear_error(main, argv)
