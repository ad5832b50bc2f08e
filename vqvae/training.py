"""The training layer both stages share: CLI from config dataclasses, run folders, checkpoints, data order.

Model code lives in `vqvae.model` and `maskgit.model`; everything here touches files, processes or the
command line. The two training scripts are thin loops over these helpers.

Run folder layout (both stages)::

    RUN_DIR/config.json          stage, model config, training config, data description, step
    RUN_DIR/model.safetensors    weights to sample or encode with (stage 2: the EMA weights)
    RUN_DIR/metrics.jsonl        one JSON object per evaluation / log interval
    RUN_DIR/checkpoints/step_N/  complete resume state (accelerate's save_state + manifest.json)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
import typing
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
METRICS_NAME = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class RunFolderError(RuntimeError):
    """A run folder is missing, of the wrong stage, or holds files that cannot be read."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------------
# Command line from dataclasses


def _field_type(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    return hints[f.name]


def _parser_for(tp):
    """Return (argparse type, nargs) for a dataclass field type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        inner = [a for a in args if a is not type(None)]
        base_type, nargs = _parser_for(inner[0])

        def maybe_none(text, _base=base_type):
            return _EXPLICIT_NONE if text.lower() == "none" else _base(text)

        return maybe_none, nargs
    if origin is tuple:
        return args[0], "+"
    if tp is bool:
        return _parse_bool, None
    return tp, None


class _ExplicitNone:
    """`--field none` on an Optional field: argparse's None already means "not passed"."""


_EXPLICIT_NONE = _ExplicitNone()


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_args(parser: argparse.ArgumentParser, *config_classes) -> None:
    """Expose every field of the given config dataclasses as `--field-name` (default: the preset's value)."""
    for cls in config_classes:
        group = parser.add_argument_group(f"{cls.__name__} (overrides the preset)")
        for f in fields(cls):
            tp = _field_type(cls, f)
            arg_type, nargs = _parser_for(tp)
            flag = "--" + f.name.replace("_", "-")
            extra = {"nargs": "?", "const": True} if tp is bool else {"nargs": nargs}  # `--flag` alone = true
            group.add_argument(flag, dest=f.name, type=arg_type, default=None, **extra)


def apply_overrides(config, args: argparse.Namespace):
    """Copy of `config` with every field the user passed on the command line replaced."""
    changes = {}
    for f in fields(config):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if value is _EXPLICIT_NONE:
            value = None
        elif isinstance(getattr(config, f.name), tuple) or typing.get_origin(_field_type(type(config), f)) is tuple:
            value = tuple(value)
        changes[f.name] = value
    return dataclasses.replace(config, **changes)


def explicit_overrides(config_classes, args: argparse.Namespace) -> dict:
    """The config fields the user passed explicitly on the command line."""
    out = {}
    for cls in config_classes:
        for f in fields(cls):
            value = getattr(args, f.name, None)
            if value is not None:
                out[f.name] = None if value is _EXPLICIT_NONE else value
    return out


def config_from_dict(cls, data: dict):
    """Rebuild a config dataclass from its JSON dict (lists become tuples); unknown keys are an error."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise RunFolderError(f"config has fields {unknown} that {cls.__name__} does not know: "
                             "the run was written by a newer or different version of this toolkit")
    values = {}
    for name, value in data.items():
        if isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def resolve_run_configs(args, *, stage: str, config_classes: tuple, presets: dict, resumable: set):
    """(model config, training config, saved run config or None) for a new run or a resumed one.

    A new run takes the preset plus the command-line overrides and refuses a folder that already holds a
    run. A resumed run takes the folder's own config.json; only the `resumable` settings may change."""
    run_dir = Path(args.out)
    model_cls, train_cls = config_classes
    try:
        if args.resume:
            saved = read_run_config(run_dir, stage)
            model_cfg = config_from_dict(model_cls, saved["model"])
            train_cfg = config_from_dict(train_cls, saved["train"])
            current = {**dataclasses.asdict(model_cfg), **dataclasses.asdict(train_cfg)}
            changed = {k for k, v in explicit_overrides(config_classes, args).items()
                       if current[k] != (tuple(v) if isinstance(v, list) else v)}
            frozen = sorted(changed - resumable)
            if frozen:
                fail(f"--resume continues the run as configured in {run_dir / CONFIG_NAME}; these settings differ "
                     f"from it and cannot change mid-run: {frozen} (only {sorted(resumable)} can)")
            return model_cfg, apply_overrides(train_cfg, args), saved
        if (run_dir / CONFIG_NAME).exists():
            has_checkpoint = any((run_dir / CHECKPOINTS_DIR).glob("step_*"))
            fail(f"{run_dir} already holds a run: " + (
                "pass --resume to continue it, or choose another --out" if has_checkpoint else
                "it stopped before its first checkpoint, so there is nothing to resume; delete the folder or "
                "choose another --out"))
        model_cfg, train_cfg = presets[args.preset]
        return apply_overrides(model_cfg, args), apply_overrides(train_cfg, args), None
    except (RunFolderError, ValueError) as err:
        fail(str(err))


def format_config(title: str, config) -> str:
    """A config dataclass as aligned `name = value` lines for the start-of-run printout."""
    rows = [f"{f.name} = {getattr(config, f.name)!r}" for f in fields(config)]
    return title + ":\n" + "\n".join("  " + r for r in rows)


# ----------------------------------------------------------------------------------------------
# Run folders


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file so that a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_run_config(run_dir: Path, stage: str, **sections) -> None:
    """Write RUN_DIR/config.json: the stage name, then each section (dataclasses become dicts)."""
    payload = {"stage": stage, "format_version": FORMAT_VERSION}
    for name, value in sections.items():
        payload[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    atomic_write_text(Path(run_dir) / CONFIG_NAME, json.dumps(payload, indent=2) + "\n")


def read_run_config(run_dir, expect_stage: str) -> dict:
    """Read RUN_DIR/config.json and check it belongs to `expect_stage`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} is not a folder: pass the output folder of a training run")
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        raise RunFolderError(f"{run_dir} has no {CONFIG_NAME}: it is not a run folder of this toolkit "
                             "(or training was interrupted before the first save)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunFolderError(f"{path} is corrupt ({err}); restore it from a checkpoint folder") from err
    stage = config.get("stage")
    if stage != expect_stage:
        hint = {
            "vqvae": "it is a stage-1 (tokenizer) run: train_maskgit.py takes it as --vq, sample.py needs a stage-2 run",
            "maskgit": "it is a stage-2 (transformer) run: pass it to sample.py --checkpoint, not as a tokenizer",
        }.get(stage, "")
        raise RunFolderError(f"{run_dir} is a {stage!r} run, expected a {expect_stage!r} run" +
                             (f"; {hint}" if hint else ""))
    return config


def save_weights(model: torch.nn.Module, path) -> None:
    """Save a module's weights as safetensors, atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_model(model, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_weights(model: torch.nn.Module, path) -> None:
    """Load safetensors weights into `model` strictly, with a clear error for missing or damaged files."""
    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f"{path} is missing: the run folder is incomplete (was training interrupted "
                             "before the first save?)")
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, ValueError) as err:
        raise RunFolderError(f"{path} is truncated or corrupt ({err}); resume the run to rewrite it, or "
                             "copy model.safetensors from a checkpoint folder") from err
    except RuntimeError as err:
        raise RunFolderError(f"{path} does not match the config beside it ({err})") from err
    if missing or unexpected:
        raise RunFolderError(f"{path} does not match the config beside it: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")


# ----------------------------------------------------------------------------------------------
# Checkpoints: atomic, verified, rotated


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def verify_checkpoint(folder: Path) -> str | None:
    """None if every file listed in the checkpoint's manifest is present and intact, else the reason."""
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"manifest.json is unreadable ({err})"
    entries = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(entries, dict):
        return "manifest.json lists no files"
    for name, entry in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} is truncated or altered ({size} bytes, expected {entry['size']})"
        if _sha256(path) != entry["sha256"]:
            return f"{name} is corrupt (checksum mismatch)"
    return None


class Checkpoints:
    """Resume checkpoints under RUN_DIR/checkpoints: written atomically, verified on load, the last K kept.

    A save goes to a hidden temporary folder, gets a manifest of file sizes and checksums, and is renamed
    into place; only then are older checkpoints pruned. A failed save (a full disk, say) therefore never
    touches an earlier checkpoint.
    """

    def __init__(self, run_dir, accelerator, keep_last: int):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(run_dir) / CHECKPOINTS_DIR
        self.accelerator = accelerator
        self.keep_last = keep_last

    def all(self) -> list[Path]:
        """Finished checkpoint folders, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step_")]
        return sorted(found, key=lambda p: int(p.name.split("_")[1]))

    def save(self, step: int) -> Path:
        acc = self.accelerator
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
        except BaseException:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        acc.wait_for_everyone()
        if acc.is_main_process:
            try:
                files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
                         for p in sorted(tmp.rglob("*")) if p.is_file()}
                atomic_write_text(tmp / MANIFEST_NAME, json.dumps({"step": step, "files": files}, indent=1))
                _fsync_tree(tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            for old in self.all()[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def resume(self, which: str) -> Path:
        """Load the newest intact checkpoint (`which` = 'latest' or a checkpoint folder); return its path.

        A damaged checkpoint is reported and the previous one is tried, down to the oldest.
        """
        candidates = self.all()
        if which != "latest":
            wanted = Path(which).resolve()
            if not Path(which).is_dir():
                raise RunFolderError(f"--resume {which}: no such checkpoint folder "
                                     f"(available: {[p.name for p in candidates] or 'none'})")
            # the named checkpoint is tried first (wherever it lives), then this run's older ones
            older = [p for p in candidates if p.resolve() != wanted and _step_of(p) < _step_of(wanted)]
            candidates = older + [Path(which)]
        if not candidates:
            raise RunFolderError(f"--resume: no checkpoint under {self.root} to resume from")
        for path in reversed(candidates):
            problem = verify_checkpoint(path)
            if problem is None:
                try:
                    self.accelerator.load_state(str(path))
                    return path
                except Exception as err:  # a checkpoint from another config, or damaged beyond the manifest
                    problem = f"could not be loaded ({type(err).__name__}: {err})"
            warnings.warn(f"checkpoint {path} is unusable: {problem}; falling back to the previous one",
                          stacklevel=2)
        raise RunFolderError(f"no usable checkpoint under {self.root}: every one is damaged (see warnings)")


def _step_of(path: Path) -> int:
    try:
        return int(Path(path).name.split("_")[1])
    except (IndexError, ValueError):
        return -1


@dataclass
class TrainState:
    """Counters saved with every checkpoint (registered with accelerate)."""

    step: int = 0            # optimizer steps taken
    images_seen: int = 0     # training images consumed, summed over processes (survives a change of GPU count)
    skipped_steps: int = 0   # steps skipped because the loss was not finite (only with --skip-nonfinite)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# ----------------------------------------------------------------------------------------------
# Data order: a pure function of (seed, step), so resume continues exactly where the run stopped


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this process's index lists, micro-batch after micro-batch, from optimizer step `start_step` on.

    The global order is a fresh permutation of the dataset every epoch (seeded by seed and epoch). Each
    optimizer step consumes `global_batch` consecutive positions of that order; process r of R takes its
    slice of every micro-batch, so processes never see the same image in a step and the data position
    after a resume is known from the step alone.
    """

    def __init__(self, num_items: int, global_batch: int, *, seed: int, rank: int, world_size: int,
                 grad_accum: int = 1, start_step: int = 0, total_steps: int | None = None):
        if num_items < 1:
            raise ValueError("the dataset is empty")
        per_update = world_size * grad_accum
        if global_batch % per_update:
            raise ValueError(f"batch_size {global_batch} must be divisible by processes x grad_accum "
                             f"= {world_size} x {grad_accum}")
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.micro = global_batch // per_update
        self.start_step, self.total_steps = start_step, total_steps
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_items, generator=gen), epoch
        return self._perm

    def global_indices(self, step: int) -> torch.Tensor:
        """All indices of optimizer step `step`, in the order they are split across micro-batches/processes."""
        start = step * self.global_batch
        positions = torch.arange(start, start + self.global_batch)
        epochs = positions // self.num_items
        out = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            sel = epochs == epoch
            out[sel] = self._permutation(epoch)[positions[sel] % self.num_items]
        return out

    def local_indices(self, step: int, micro_step: int) -> list[int]:
        chunk = self.global_indices(step).view(self.grad_accum, self.world_size, self.micro)
        return chunk[micro_step, self.rank].tolist()

    def __iter__(self):
        step = self.start_step
        while self.total_steps is None or step < self.total_steps:
            for micro_step in range(self.grad_accum):
                yield self.local_indices(step, micro_step)
            step += 1

    def __len__(self):
        if self.total_steps is None:
            raise TypeError("an endless sampler has no length")
        return (self.total_steps - self.start_step) * self.grad_accum


def step_generator(seed: int, step: int, micro_step: int, rank: int) -> torch.Generator:
    """A CPU generator for per-step augmentation: the same on a resumed run as on an uninterrupted one."""
    mixed = ((seed * 1_000_003 + step) * 1_009 + micro_step) * 10_007 + rank
    return torch.Generator().manual_seed(mixed % (2**63))


# ----------------------------------------------------------------------------------------------
# Accelerate set-up, logging and the learning-rate schedule


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def make_accelerator(run_dir, *, mixed_precision: str, grad_accum: int, cpu: bool = False,
                     find_unused_parameters: bool = False):
    """An Accelerator that logs to TensorBoard when it is installed and leaves the LR schedule to us.

    `find_unused_parameters` is for training phases that leave part of the model without gradients
    (a critic-only phase, say), which DistributedDataParallel otherwise rejects."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # `accelerate launch --multi_gpu` on a machine without GPUs: accelerate only sets up the CPU (gloo)
        # process group when asked for the CPU, and would otherwise run N unrelated single-process copies.
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


def lr_factor(kind: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """LR multiplier per step: linear warm-up, then constant or cosine decay to `min_ratio` at `total_steps`."""
    if kind not in ("constant", "cosine"):
        raise ValueError(f"unknown LR schedule {kind!r}: choose 'constant' or 'cosine'")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def lr_schedule(optimizer, kind: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """A LambdaLR following `lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(kind, warmup_steps, total_steps, min_ratio))


class MetricsLog:
    """Appends one JSON object per call to RUN_DIR/metrics.jsonl and forwards it to accelerate's trackers."""

    def __init__(self, run_dir, accelerator):
        self.path = Path(run_dir) / METRICS_NAME
        self.accelerator = accelerator

    def drop_after(self, step: int) -> None:
        """Forget records past `step`: a resumed run rewrites them (main process only)."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        record = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        # strict JSON has no NaN/inf: a non-finite value is written as null
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        if self.accelerator.is_main_process:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "step"}
        self.accelerator.log(scalars, step=record.get("step"))


def flat_hparams(**sections) -> dict:
    """Config sections flattened to scalars for TensorBoard's hparams view."""
    out = {}
    for name, section in sections.items():
        values = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section
        for key, value in values.items():
            out[f"{name}/{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


class Throughput:
    """Images per second over the last log interval, and wall time since the start."""

    def __init__(self):
        self.start = self.mark = time.perf_counter()
        self.images = 0

    def add(self, images: int) -> None:
        self.images += images

    def read(self) -> dict:
        now = time.perf_counter()
        rate = self.images / max(now - self.mark, 1e-9)
        self.mark, self.images = now, 0
        return {"images_per_s": rate, "wall_time_s": now - self.start}


def check_finite(loss: torch.Tensor, accelerator) -> bool:
    """True when the loss is finite on every process (all processes reach the same verdict)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    return accelerator.reduce(bad, reduction="sum").item() == 0


def nonfinite_message(loss: torch.Tensor, step: int, checkpoints: Checkpoints) -> str:
    """What to tell the user when the loss stops being finite during update `step + 1`."""
    kept = checkpoints.all()
    return (f"loss is {loss.item()} at step {step + 1}: the run stops here and keeps its last checkpoint "
            f"({kept[-1] if kept else 'none was written yet'}). Lower --lr or use --mixed-precision no and "
            "continue with --resume, or pass --skip-nonfinite to skip such steps")


def fail(message: str, code: int = 2) -> typing.NoReturn:
    """Print an actionable error and exit (for argument problems found before any work starts)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
