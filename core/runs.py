"""Run folders: the on-disk format both stages share, and a typed view of one.

    RUN_DIR/config.json          stage, format_version, model and training configs, data description, step
    RUN_DIR/model.safetensors    the raw weights (stage 1: the tokenizer; stage 2: the transformer)
    RUN_DIR/ema.safetensors      stage 2 with an EMA: the averaged weights, which sampling uses by default
    RUN_DIR/metrics.jsonl        one JSON object per evaluation
    RUN_DIR/checkpoints/step_N/  complete resume state, with a copy of config.json (see core.checkpoints)
    RUN_DIR/.lock                while a run uses the folder (see core.lock)

`format_version` 1 is the only format so far; a reader refuses a newer one instead of guessing.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from .cli import (RUN_SOURCES, ClearError, ConfigError, apply_overrides, config_from_dict, explicit_overrides, fail,
                  given)

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


class DiskFullError(ClearError):
    """A write failed because the disk (or the file size limit, or the quota) is full."""


DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# what torch's and safetensors' writers say when a write of theirs failed for want of space: torch's zip writer
# only reports the short write ("unexpected pos 74944 vs 74832"), safetensors the OS error (28, or 27 for EFBIG)
DISK_FULL_MESSAGES = ("no space left on device", "os error 28", "os error 27", "os error 122", "file too large",
                      "disk quota exceeded", "unexpected pos", "pytorchstreamwriter failed writing",
                      "file write failed")


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` (or an exception it wraps) is a write that failed for want of space."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, DiskFullError):
            return True
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(err, (RuntimeError, SafetensorError, OSError)) and any(
                m in str(err).lower() for m in DISK_FULL_MESSAGES):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def reporting_disk_full(what: str, consequence: str = ""):
    """Turn a write that fails for want of space into DiskFullError("no space left on device while writing ...")."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as err:  # DiskFullError too: the outermost `what` is reported
        if not is_disk_full(err):
            raise
        cause = err.__cause__ if isinstance(err, DiskFullError) and err.__cause__ is not None else err
        raise DiskFullError(f"no space left on device while writing {what} ({type(cause).__name__}: {cause})"
                            + (f"; {consequence}" if consequence else "")) from cause


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file so that a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with reporting_disk_full(str(path), "the previous version of the file is kept"):
            with open(tmp, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _non_finite(value, where: str = ""):
    """The dotted path of the first NaN or infinity in a JSON value, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "(top level)"
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _non_finite(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def restore_advice(run_dir, name: str) -> str:
    """How to get a good copy of RUN_DIR/`name` back: the exact copy from the newest intact checkpoint holding it."""
    from .checkpoints import newest_intact_holding  # checkpoints builds on this module

    run_dir = Path(run_dir)
    source = newest_intact_holding(run_dir / CHECKPOINTS_DIR, name)
    if source is None:
        return f"no intact checkpoint under {run_dir / CHECKPOINTS_DIR} holds a copy of {name}"
    return f"restore it from the newest intact checkpoint: copy {source / name} to {run_dir / name}"


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
        raise RunFolderError(f"{path} is corrupt ({err}); {restore_advice(run_dir, CONFIG_NAME)}") from err
    if not isinstance(config, dict):
        raise RunFolderError(f"{path} is not a run config (a JSON object); {restore_advice(run_dir, CONFIG_NAME)}")
    bad = _non_finite(config)
    if bad:
        raise RunFolderError(f"{path}: {bad} is not a finite number (NaN or infinity): the file was edited or "
                             f"damaged; {restore_advice(run_dir, CONFIG_NAME)}")
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

    def _value(self, section: str, key: str, kind=None, minimum: int | None = None):
        name = ".".join(filter(None, (section, key)))
        try:
            value = self._section(section)[key] if section else self.config[key]
        except KeyError:
            raise RunFolderError(f"{self.path / CONFIG_NAME} has no {name}: the file was edited or damaged") from None
        if kind is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            what = {int: "an integer", list: "a list", str: "a string"}.get(kind, f"a {kind.__name__}")
            raise RunFolderError(f"{self.path / CONFIG_NAME}: {name} = {value!r} is not {what}: the file was edited "
                                 "or damaged")
        if minimum is not None and value < minimum:
            raise RunFolderError(f"{self.path / CONFIG_NAME}: {name} = {value!r} must be >= {minimum}: the file was "
                                 "edited or damaged")
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
        return self._value("model" if self.stage == "vqvae" else "data", "image_size", int, minimum=1)

    @property
    def tokenizer_source(self) -> dict:
        """Stage 2: where its tokenizer comes from: a published tokenizer's record, or our stage-1 folder."""
        if "tokenizer" in self.data:
            return self._value("data", "tokenizer", dict)
        return {"kind": "own", "location": "local", "path": str(self.tokenizer_path)}

    @property
    def tokenizer_path(self) -> Path:
        """Stage 2: the stage-1 run folder the codes came from (a relative path, as in a published run, is
        relative to this run's folder)."""
        path = Path(self._value("data", "vq_run", str))
        return path if path.is_absolute() else self.path / path

    @property
    def step(self) -> int | None:
        return self.config.get("step")

    @property
    def has_ema(self) -> bool:
        return bool(self.config.get("ema", False))

    @property
    def classes(self) -> list[str]:
        classes = self._value(None, "classes", list)
        if not all(isinstance(c, str) for c in classes):
            raise RunFolderError(f"{self.path / CONFIG_NAME}: classes = {classes!r} is not a list of class names")
        return list(classes)

    @property
    def num_classes(self) -> int:
        count = self._value(None, "num_classes", int, minimum=0)
        if count and count != len(self.classes):
            raise RunFolderError(f"{self.path / CONFIG_NAME}: num_classes = {count} but {len(self.classes)} class "
                                 "names are listed: the file was edited or damaged")
        return count

    @property
    def grid(self) -> tuple[int, int]:
        grid = self._value(None, "grid", list)
        if len(grid) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in grid):
            raise RunFolderError(f"{self.path / CONFIG_NAME}: grid = {grid!r} is not [height, width] in codes: the "
                                 "file was edited or damaged")
        return grid[0], grid[1]

    @property
    def codebook_size(self) -> int:
        return self._value(None, "codebook_size", int, minimum=2)

    def weights_path(self, ema: bool = False) -> Path:
        return self.path / (EMA_WEIGHTS_NAME if ema else WEIGHTS_NAME)

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_NAME

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR


def save_weights(model: torch.nn.Module, path, metadata: dict[str, str] | None = None) -> None:
    """Save a module's weights as safetensors, atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with reporting_disk_full(str(path), "the previous version of the file is kept"):
            save_model(model, str(tmp), metadata=metadata)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# Prefixes wrappers add to parameter names: DistributedDataParallel and torch.compile. A resume checkpoint's
# model.safetensors (accelerate's save_state) keeps them, so that it can serve as a run's weights file as well.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _wrapper_chain(path: Path) -> list[str]:
    """The wrapper attributes (outermost first) that every tensor name in a safetensors file starts with."""
    with safe_open(str(path), framework="pt") as fh:
        names = list(fh.keys())
    chain = []
    while names:
        prefix = next((p for p in WRAPPER_PREFIXES if all(n.startswith(p) for n in names)), None)
        if prefix is None:
            break
        chain.append(prefix[:-1])
        names = [n[len(prefix):] for n in names]
    return chain


def load_weights(model: torch.nn.Module, path, *, advice: bool = True) -> None:
    """Load safetensors weights into `model` strictly, with a clear error for missing or damaged files.

    Names written through a wrapper (`module.` of DistributedDataParallel, `_orig_mod.` of torch.compile) are
    accepted, so a checkpoint's model.safetensors loads as well as the run folder's. The error for a run folder's
    file says which checkpoint holds a good copy (`advice=False`: a file inside a checkpoint, which has none)."""
    path = Path(path)
    restore = (lambda: "; " + restore_advice(path.parent, path.name)) if advice else (lambda: "")
    if not path.is_file():
        raise RunFolderError(f"{path} is missing: the run folder is incomplete (was training interrupted before "
                             f"the first save?){restore()}")
    try:
        target = model
        for attribute in reversed(_wrapper_chain(path)):  # wrap the model as the saved names expect
            holder = torch.nn.Module()
            setattr(holder, attribute, target)
            target = holder
        missing, unexpected = load_model(target, str(path), strict=False)
    except (SafetensorError, OSError, ValueError) as err:
        raise RunFolderError(f"{path} is truncated or corrupt ({err}){restore()}") from err
    except RuntimeError as err:
        raise RunFolderError(f"{path} does not match the config beside it ({err})") from err
    if missing or unexpected:
        raise RunFolderError(f"{path} does not match the config beside it: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")


def _as_recorded(name: str, value: str) -> str:
    """A --data/--data-root/--preset value as a run records it (core.data.canonical_data for --data)."""
    from .data import canonical_data

    if name == "preset":
        return value
    return canonical_data(value) if name == "data" else str(Path(value).expanduser().resolve())


def changed_sources(args, run: Run) -> list[str]:
    """The typed --data, --data-root, --preset that differ from what the run recorded (a resume cannot change them)."""
    recorded = run.data
    return [f"--{name.replace('_', '-')} (the run's: {recorded.get(name)!r})" for name in RUN_SOURCES
            if given(args, name) and _as_recorded(name, getattr(args, name)) != recorded.get(name)]


def _count_files(data: str) -> int | None:
    """Image files of a folder dataset (None for the built-in ones, or a folder that cannot be listed)."""
    from .data import BUILTIN_DATASETS, _find_images

    if data in BUILTIN_DATASETS:
        return None
    try:
        return len(_find_images(Path(data).expanduser())[0])
    except (OSError, ValueError):  # not a folder (an hf: source, say)
        return None


def note_dataset(data: dict, image_size: int, *, resumed: bool, accelerator=None) -> dict:
    """`data` (a run's data description) with the dataset's fingerprint recorded when the run starts.

    A resumed run keeps the fingerprint of its start and warns (main process) when the files changed since:
    the run continues on the data as it is now. Runs written before fingerprints were recorded are not checked."""
    from .data import dataset_fingerprint

    try:
        now = {"fingerprint": dataset_fingerprint(data["data"], image_size, data.get("data_root")),
               "num_files": _count_files(data["data"])}
    except Exception:  # best effort: the loader reports a missing or unreadable dataset itself
        return data
    if not resumed:
        return {**data, **now}
    before = data.get("fingerprint")
    if before is not None and before != now["fingerprint"]:
        counts = (f"{data.get('num_files')} image files when the run started, {now['num_files']} now"
                  if data.get("num_files") is not None and now["num_files"] is not None else "")
        what = ("files were added or removed" if counts and data["num_files"] != now["num_files"]
                else "files were added, removed, renamed or modified")
        message = (f"the training data {data['data']} changed since this run started ({what}"
                   + (f": {counts}" if counts else "") + "); the resumed run continues on the data as it is now, "
                   "so it is no longer an exact continuation")
        if accelerator is None or accelerator.is_main_process:
            warnings.warn(message, stacklevel=2)
    return data


def check_resumed_classes(run_dir, stage: str, classes: list[str], num_classes: int) -> None:
    """A resumed run must see the classes its class embedding was built for: say what changed if not."""
    try:
        run = Run.open(run_dir, stage)
        before, names = run.num_classes, run.classes
    except RunFolderError as err:
        fail(str(err))
    if num_classes == before:
        if num_classes and names != list(classes):
            warnings.warn(f"the class folders of {run.data.get('data')} are named differently since this run started "
                          f"({names} then, {list(classes)} now): label i now means {list(classes)}[i]", stacklevel=2)
        return
    added = sorted(set(classes) - set(names))
    removed = sorted(set(names) - set(classes))
    fail(f"--resume: the run's class embedding is built for {before} classes, but {run.data.get('data')} now gives "
         f"{num_classes}" + (f" (added: {added})" if added else "") + (f" (removed: {removed})" if removed else "")
         + ": restore the class folders as they were, or start a new run with another --out")


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
            frozen = sorted(changed - train_cls.RESUMABLE) + changed_sources(args, run)
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
