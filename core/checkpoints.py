"""Resume checkpoints: written atomically, verified against a manifest on load, the last K kept.

A checkpoint is `RUN_DIR/checkpoints/step_N/`:

    model.safetensors        the trained module (accelerate's save_state; names as the prepared module has them,
                             `module.`/`_orig_mod.` included, which core.runs.load_weights accepts)
    optimizer.bin            optimizer state  } accelerate's save_state, pickles that accelerate loads with
    scheduler.bin            LR schedule      } torch.load(weights_only=True): tensors and plain containers only,
    random_states_<i>.pkl    process i's RNGs } no code (checked before the load, see `Checkpoints.resume`)
    train_state.json         the step counters (ours: JSON)
    ema.safetensors          stage 2 with an EMA: the averaged weights in the run folder's own format (so it can
                             replace a damaged RUN_DIR/ema.safetensors), `n_averaged` in its metadata
    config.json              the run's config.json as of this checkpoint (to restore a damaged one)
    manifest.json            size and sha256 of every file above, written last

Nothing of ours is registered with accelerate: its `load_custom_state` unpickles with weights_only=False, so a
crafted `custom_checkpoint_N.pkl` could run code on --resume. Checkpoints of earlier releases hold the counters
and the EMA in such files; they are still read, with torch.load(weights_only=True), which accepts the plain data
they hold and refuses anything else (the checkpoint then counts as damaged and the previous one is tried).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .runs import (CHECKPOINTS_DIR, CONFIG_NAME, RunFolderError, atomic_write_text, load_weights,
                   reporting_disk_full, save_weights)

MANIFEST_NAME = "manifest.json"
LEGACY_STATE = "custom_checkpoint_{}.pkl"  # how accelerate stored registered objects (earlier releases)


def sha256_file(path: Path) -> str:
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
    """None if the checkpoint's manifest lists exactly its files and each is present and intact, else the reason."""
    folder = Path(folder)
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
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    unlisted = sorted(on_disk - set(entries))
    if unlisted:
        return f"it holds files its manifest does not list: {unlisted[:5]}"
    for name, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or \
                not isinstance(entry.get("sha256"), str):
            return f"manifest.json has a malformed entry for {name!r}"
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} is truncated or altered ({size} bytes, expected {entry['size']})"
        if sha256_file(path) != entry["sha256"]:
            return f"{name} is corrupt (checksum mismatch)"
    return None


def step_of(path: Path) -> int:
    """The step N of a `step_N` checkpoint folder (-1 for any other name)."""
    try:
        return int(Path(path).name.split("_")[1])
    except (IndexError, ValueError):
        return -1


def _is_averaged_model(obj) -> bool:
    from torch.optim.swa_utils import AveragedModel

    return isinstance(obj, AveragedModel)


def write_state(folder: Path, name: str, obj) -> None:
    """Write one object's state into `folder`: modules as NAME.safetensors (an EMA's `n_averaged` in the metadata),
    anything else with state_dict() as NAME.json (plain numbers and strings only)."""
    if _is_averaged_model(obj):
        save_weights(obj.module, folder / f"{name}.safetensors", metadata={"n_averaged": str(int(obj.n_averaged))})
    elif isinstance(obj, torch.nn.Module):
        save_weights(obj, folder / f"{name}.safetensors")
    else:
        atomic_write_text(folder / f"{name}.json", json.dumps(obj.state_dict(), indent=1) + "\n")


def read_state(folder: Path, name: str, obj) -> None:
    """Load what `write_state` wrote: safetensors and JSON only, nothing that can run code."""
    if isinstance(obj, torch.nn.Module):
        path = folder / f"{name}.safetensors"
        target = obj.module if _is_averaged_model(obj) else obj
        load_weights(target, path, advice=False)
        if _is_averaged_model(obj):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                count = (fh.metadata() or {}).get("n_averaged", "")
            if not count.isdigit():
                raise RunFolderError(f"{path} has no valid n_averaged in its metadata ({count!r})")
            obj.n_averaged.fill_(int(count))
    else:
        path = folder / f"{name}.json"
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise RunFolderError(f"{path} is missing or unreadable ({err})") from err
        obj.load_state_dict(state)


def read_legacy_state(path: Path, obj) -> None:
    """An earlier release's `custom_checkpoint_N.pkl`, read with weights_only=True: plain data, never code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for anything but tensors and plain containers
        raise RunFolderError(f"{path.name} cannot be loaded safely, so it is not loaded ({unpickling_reason(err)})") \
            from err
    obj.load_state_dict(state)


TORCH_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")  # what accelerate writes with torch.save


def check_file_safely(path: Path) -> None:
    """Parse one checkpoint file without running any code from it; RunFolderError naming it if that fails.

    safetensors: the header; JSON: the whole file; torch pickles (optimizer, schedule, RNG states): unpickled
    with weights_only=True and mmap (tensors are not read), with the few numpy globals accelerate allows for
    its RNG states. This is exactly how accelerate loads them, except that accelerate ignores an RNG file that
    fails to load (and would resume with other random numbers without a word)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                fh.metadata()
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix in TORCH_SUFFIXES or path.name.startswith("custom_checkpoint_"):
            from accelerate.utils import load

            try:
                load(path, map_location="cpu", mmap=True)  # weights_only=True
            except RuntimeError as err:
                if "mmap can only be used" not in str(err):
                    raise
                load(path, map_location="cpu")  # torch's legacy (non-zip) format: read whole, still weights_only
    except Exception as err:  # UnpicklingError for anything but tensors and plain data; format errors
        raise RunFolderError(f"{path.name} cannot be loaded safely, so it is not loaded ({unpickling_reason(err)})") \
            from err


def unpickling_reason(err: Exception) -> str:
    """The informative line of a load error: for weights_only refusals, what the file asked for (not torch's
    suggestion to retry with weights_only=False, which is exactly what must not be done with such a file)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        detail = next((line for line in lines[1:] if not line.startswith("Check the documentation")), "")
        return f"it holds more than tensors and plain data, and unpickling it could run code: {detail}".rstrip(": ")
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


class Checkpoints:
    """Resume checkpoints under RUN_DIR/checkpoints.

    A save goes to a hidden temporary folder, gets a manifest of file sizes and checksums, and is renamed
    into place; only then are older checkpoints pruned. A failed save (a full disk, say) therefore never
    touches an earlier checkpoint. `extra_state` ({name: object}) is saved and loaded by us, not by accelerate:
    modules as NAME.safetensors, other objects' state_dict() as NAME.json.
    """

    def __init__(self, run_dir, accelerator, keep_last: int, extra_state: dict | None = None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if getattr(accelerator, "_custom_objects", None):
            raise RuntimeError("objects are registered with accelerate's register_for_checkpointing, whose load "
                               "unpickles them with weights_only=False: pass them as Checkpoints(extra_state=...)")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS_DIR
        self.accelerator = accelerator
        self.keep_last = keep_last
        self.extra_state = dict(extra_state or {})

    def all(self) -> list[Path]:
        """Finished checkpoint folders, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step_")]
        return sorted(found, key=step_of)

    def _write_ours(self, tmp: Path, step: int) -> None:
        """Our own files (extra state, the config copy) and the manifest: main process, after accelerate's."""
        for name, obj in self.extra_state.items():
            write_state(tmp, name, obj)
        try:
            config = json.loads((self.run_dir / CONFIG_NAME).read_text())
        except (OSError, ValueError):  # none yet, or damaged: a copy could not restore it anyway
            config = None
        if isinstance(config, dict):
            if "step" in config:
                config["step"] = step  # the run as of this checkpoint
            atomic_write_text(tmp / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
        files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        atomic_write_text(tmp / MANIFEST_NAME, json.dumps({"step": step, "files": files}, indent=1))
        _fsync_tree(tmp)

    def save(self, step: int) -> Path:
        acc = self.accelerator
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        kept = self.all()
        consequence = (f"earlier checkpoints are kept (newest: {kept[-1]})" if kept else
                       "no checkpoint was written yet") + "; free some space, then continue with --resume"
        with reporting_disk_full(f"checkpoint {final}", consequence):
            if acc.is_main_process:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.glob(".tmp_step_*"):  # left by a killed save (the run folder is locked)
                    shutil.rmtree(stale, ignore_errors=True)
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
                    self._write_ours(tmp, step)
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

    def _all_agree(self, ok: bool) -> bool:
        """Whether `ok` holds on every process (each process checks its own files)."""
        if self.accelerator.num_processes == 1:
            return ok
        flags = self.accelerator.gather(torch.tensor([0 if ok else 1], device=self.accelerator.device))
        return int(flags.sum()) == 0

    def _legacy_files(self, path: Path) -> dict:
        """{name: file} of an earlier release's custom_checkpoint_N.pkl, for the extra state that has no file of
        ours."""
        if not self.extra_state or any((path / f"{name}.json").is_file() or (path / f"{name}.safetensors").is_file()
                                       for name in self.extra_state):
            return {}
        return {name: path / LEGACY_STATE.format(i) for i, name in enumerate(self.extra_state)}

    def _check(self, path: Path) -> str | None:
        """What stops `path` from being loaded safely and completely on this process, or None."""
        problem = verify_checkpoint(path)
        if problem is not None:
            return problem
        try:
            for file in sorted(path.iterdir()):
                if file.is_file():
                    check_file_safely(file)
        except RunFolderError as err:
            return str(err)
        legacy = self._legacy_files(path)
        missing = [name for name, file in legacy.items() if not file.is_file()]
        if not legacy:
            missing = [name for name, obj in self.extra_state.items()
                       if not (path / (f"{name}.safetensors" if isinstance(obj, torch.nn.Module) else f"{name}.json")
                               ).is_file()]
        if missing:
            return f"it holds no saved state for {missing}"
        return None

    def _load(self, path: Path) -> None:
        legacy = self._legacy_files(path)
        if legacy:
            # accelerate insists on loading custom_checkpoint_N.pkl itself (weights_only=False) when any exist: let it
            # see a view of the folder without them, and read them ourselves with weights_only=True
            for name, file in legacy.items():
                read_legacy_state(file, self.extra_state[name])
            with tempfile.TemporaryDirectory(prefix="checkpoint_view_") as view:
                for file in path.iterdir():
                    if not file.name.startswith("custom_checkpoint_"):
                        os.symlink(file.resolve(), Path(view) / file.name)
                self.accelerator.load_state(view)
        else:
            self.accelerator.load_state(str(path))
            for name, obj in self.extra_state.items():
                read_state(path, name, obj)

    def resume(self, which: str) -> Path:
        """Load the newest intact checkpoint (`which` = 'latest' or a checkpoint folder); return its path.

        A damaged checkpoint is reported and the previous one is tried, down to the oldest. Only safetensors,
        JSON and (through accelerate) torch.load(weights_only=True) read anything: no file can run code.
        """
        candidates = self.all()
        if which != "latest":
            wanted = Path(which).resolve()
            if not Path(which).is_dir():
                raise RunFolderError(f"--resume {which}: no such checkpoint folder "
                                     f"(available: {[p.name for p in candidates] or 'none'})")
            # the named checkpoint is tried first (wherever it lives), then this run's older ones
            older = [p for p in candidates if p.resolve() != wanted and step_of(p) < step_of(wanted)]
            candidates = older + [Path(which)]
        if not candidates:
            raise RunFolderError(f"--resume: no checkpoint under {self.root} to resume from")
        for path in reversed(candidates):
            problem = self._check(path)
            if self._all_agree(problem is None):
                try:
                    self._load(path)
                except Exception as err:  # a checkpoint from another config, or damaged beyond the manifest
                    problem = f"could not be loaded ({type(err).__name__}: {err})"
                if self._all_agree(problem is None):
                    return path
            problem = problem or "another process could not load its part of it"
            warnings.warn(f"checkpoint {path} is unusable: {problem}; falling back to the previous one",
                          stacklevel=2)
        raise RunFolderError(f"no usable checkpoint under {self.root}: every one is damaged (see warnings)")


def newest_intact_holding(root, name: str) -> Path | None:
    """The newest intact checkpoint folder under `root` that holds a file `name`, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), key=step_of)
    for path in reversed(found):
        if (path / name).is_file() and verify_checkpoint(path) is None:
            return path
    return None


@dataclass
class TrainState:
    """Counters saved with every checkpoint (as train_state.json)."""

    step: int = 0            # optimizer steps taken
    images_seen: int = 0     # training images consumed, summed over processes (survives a change of GPU count)
    skipped_steps: int = 0   # steps skipped because the loss was not finite (only with --skip-nonfinite)

    def advance(self, global_batch: int, skipped: bool) -> None:
        """Count one optimizer update of `global_batch` images."""
        self.step += 1
        self.images_seen += global_batch
        self.skipped_steps += int(skipped)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        names = {f.name for f in dataclasses.fields(self)}
        if not isinstance(state, dict) or set(state) != names or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in state.values()):
            raise ValueError(f"expected the counters {sorted(names)} as non-negative integers, got {state!r}")
        for key, value in state.items():
            setattr(self, key, value)


def start_or_resume(accelerator, run_dir, keep_last: int, resume: str | None, *, ema=None) -> tuple[TrainState,
                                                                                                   Checkpoints]:
    """The run's counters and checkpoints, after `accelerator.prepare`: the counters and `ema` (an AveragedModel)
    are saved with every checkpoint; with `resume` ('latest' or a checkpoint folder) the newest intact checkpoint
    is loaded and metrics past its step are dropped (a resumed run writes them again)."""
    from .cli import fail
    from .metrics_log import MetricsLog

    state = TrainState()
    extra = {"train_state": state, **({"ema": ema} if ema is not None else {})}
    checkpoints = Checkpoints(run_dir, accelerator, keep_last, extra_state=extra)
    if resume:
        try:
            resumed = checkpoints.resume(resume)
        except RunFolderError as err:
            fail(str(err))
        accelerator.print(f"resumed from {resumed} at step {state.step}")
        MetricsLog(run_dir, accelerator).drop_after(state.step)
    return state, checkpoints
