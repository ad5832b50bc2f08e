"""Run folders: the on-disk format both stages share, and a typed view of one.

    RUN_DIR/config.json          stage, format_version, model and training configs, data description, step
    RUN_DIR/model.safetensors    the raw weights (stage 1: the tokenizer; stage 2: the transformer)
    RUN_DIR/ema.safetensors      stage 2 with an EMA: the averaged weights, which sampling uses by default
    RUN_DIR/metrics.jsonl        one JSON object per evaluation
    RUN_DIR/checkpoints/step_N/  complete resume state (see core.checkpoints)

`format_version` 1 is the only format so far; a reader refuses a newer one instead of guessing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from .cli import ConfigError, apply_overrides, config_from_dict, explicit_overrides, fail

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EMA_WEIGHTS_NAME = "ema.safetensors"
METRICS_NAME = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
FORMAT_VERSION = 1
STAGE_HINTS = {
    "vqvae": "it is a stage-1 (tokenizer) run: train_maskgit.py takes it as --vq, sample.py needs a stage-2 run",
    "maskgit": "it is a stage-2 (transformer) run: pass it to sample.py --checkpoint, not as a tokenizer",
}


class RunFolderError(RuntimeError):
    """A run folder is missing, of the wrong stage, or holds files that cannot be read."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file so that a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_run_config(run_dir: Path, stage: str, **sections) -> None:
    """Write RUN_DIR/config.json: the stage name, then each section (dataclasses become dicts)."""
    payload = {"stage": stage, "format_version": FORMAT_VERSION}
    for name, value in sections.items():
        payload[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    atomic_write_text(Path(run_dir) / CONFIG_NAME, json.dumps(payload, indent=2) + "\n")


def read_run_config(run_dir, expect_stage: str) -> dict:
    """RUN_DIR/config.json as a dict, checked to belong to `expect_stage` and to a format this code reads."""
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
    if not isinstance(config, dict):
        raise RunFolderError(f"{path} is not a run config (a JSON object)")
    stage = config.get("stage")
    if stage != expect_stage:
        what = f"a {stage!r} run" if stage else ("a diffusers model folder" if "_class_name" in config
                                                   else "not a run folder of this toolkit")
        hint = STAGE_HINTS.get(stage, "")
        raise RunFolderError(f"{run_dir} is {what}, expected a {expect_stage!r} run" + (f"; {hint}" if hint else ""))
    version = config.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise RunFolderError(f"{path} has format_version {version!r}; this toolkit reads up to {FORMAT_VERSION}: "
                             "update the toolkit")
    return config


@dataclass
class Run:
    """A run folder read back: its stage, its configs (as saved), its files, and the tokenizer it links to."""

    path: Path
    config: dict  # config.json as saved

    @classmethod
    def open(cls, path, stage: str) -> Run:
        return cls(Path(path), read_run_config(path, stage))

    def _section(self, name: str) -> dict:
        section = self.config.get(name)
        if not isinstance(section, dict):
            raise RunFolderError(f"{self.path / CONFIG_NAME} has no {name!r} section: the file was edited or damaged")
        return section

    def _value(self, section: str, key: str, kind=None):
        try:
            value = self._section(section)[key] if section else self.config[key]
        except KeyError:
            raise RunFolderError(f"{self.path / CONFIG_NAME} has no {'.'.join(filter(None, (section, key)))}: "
                                 "the file was edited or damaged") from None
        if kind is not None and not isinstance(value, kind):
            raise RunFolderError(f"{self.path / CONFIG_NAME}: {'.'.join(filter(None, (section, key)))} = {value!r} "
                                 f"is not a {kind.__name__}")
        return value

    @property
    def stage(self) -> str:
        return self.config["stage"]

    @property
    def model(self) -> dict:
        return self._section("model")

    @property
    def train(self) -> dict:
        return self._section("train")

    @property
    def data(self) -> dict:
        """Where the images come from: {'data': source, 'data_root': ..., 'preset': ...} (+ stage 2's links)."""
        return self._section("data")

    def model_config(self, cls):
        try:
            return config_from_dict(cls, self.model)
        except ConfigError as err:
            raise RunFolderError(f"{self.path / CONFIG_NAME}: {err}") from err

    def train_config(self, cls):
        try:
            return config_from_dict(cls, self.train)
        except ConfigError as err:
            raise RunFolderError(f"{self.path / CONFIG_NAME}: {err}") from err

    @property
    def image_size(self) -> int:
        """Training resolution: the tokenizer's own (stage 1) or the one its codes were made at (stage 2)."""
        return self._value("model" if self.stage == "vqvae" else "data", "image_size", int)

    @property
    def tokenizer_path(self) -> Path:
        """Stage 2: the stage-1 run folder the codes came from."""
        return Path(self._value("data", "vq_run", str))

    @property
    def step(self) -> int | None:
        return self.config.get("step")

    @property
    def has_ema(self) -> bool:
        return bool(self.config.get("ema", False))

    @property
    def classes(self) -> list[str]:
        return list(self._value(None, "classes", list))

    @property
    def num_classes(self) -> int:
        return self._value(None, "num_classes", int)

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self._value(None, "grid", list)
        return int(h), int(w)

    @property
    def codebook_size(self) -> int:
        return self._value(None, "codebook_size", int)

    def weights_path(self, ema: bool = False) -> Path:
        return self.path / (EMA_WEIGHTS_NAME if ema else WEIGHTS_NAME)

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_NAME

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR


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


def resolve_run_configs(args, *, stage: str, config_classes: tuple, presets: dict):
    """(model config, training config, saved Run or None) for a new run or a resumed one.

    A new run takes the preset plus the command-line overrides and refuses a folder that already holds a
    run. A resumed run takes the folder's own config.json; only the training config's RESUMABLE settings
    may change."""
    run_dir = Path(args.out)
    model_cls, train_cls = config_classes
    try:
        if args.resume:
            run = Run.open(run_dir, stage)
            model_cfg, train_cfg = run.model_config(model_cls), run.train_config(train_cls)
            current = {**dataclasses.asdict(model_cfg), **dataclasses.asdict(train_cfg)}
            changed = {k for k, v in explicit_overrides(config_classes, args).items() if current[k] != v}
            frozen = sorted(changed - train_cls.RESUMABLE)
            if frozen:
                fail(f"--resume continues the run as configured in {run_dir / CONFIG_NAME}; these settings differ "
                     f"from it and cannot change mid-run: {frozen} (only {sorted(train_cls.RESUMABLE)} can)")
            return model_cfg, apply_overrides(train_cfg, args), run
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
