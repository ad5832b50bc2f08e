"""Resume checkpoints: written atomically, verified against a manifest on load, the last K kept.

A checkpoint is `RUN_DIR/checkpoints/step_N/`: accelerate's `save_state` (model, optimizer, LR schedule,
every process's RNG states, and the objects registered for checkpointing) plus `manifest.json`, the size and
sha256 of every file. The weights to sample or encode with live beside the config (core.runs), not here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from .runs import CHECKPOINTS_DIR, RunFolderError, atomic_write_text

MANIFEST_NAME = "manifest.json"


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
        if sha256_file(path) != entry["sha256"]:
            return f"{name} is corrupt (checksum mismatch)"
    return None


def step_of(path: Path) -> int:
    """The step N of a `step_N` checkpoint folder (-1 for any other name)."""
    try:
        return int(Path(path).name.split("_")[1])
    except (IndexError, ValueError):
        return -1


class Checkpoints:
    """Resume checkpoints under RUN_DIR/checkpoints.

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
        return sorted(found, key=step_of)

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
                files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
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
            older = [p for p in candidates if p.resolve() != wanted and step_of(p) < step_of(wanted)]
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


@dataclass
class TrainState:
    """Counters saved with every checkpoint (registered with accelerate)."""

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
        for key, value in state.items():
            setattr(self, key, value)


def start_or_resume(accelerator, run_dir, keep_last: int, resume: str | None, *registered) -> tuple[TrainState,
                                                                                                   Checkpoints]:
    """The run's counters and checkpoints, after `accelerator.prepare`: `registered` (an EMA, say) are saved with
    every checkpoint; with `resume` ('latest' or a checkpoint folder) the newest intact checkpoint is loaded and
    metrics past its step are dropped (a resumed run writes them again)."""
    from .cli import fail
    from .metrics_log import MetricsLog

    state = TrainState()
    accelerator.register_for_checkpointing(state, *registered)
    checkpoints = Checkpoints(run_dir, accelerator, keep_last)
    if resume:
        try:
            resumed = checkpoints.resume(resume)
        except RunFolderError as err:
            fail(str(err))
        accelerator.print(f"resumed from {resumed} at step {state.step}")
        MetricsLog(run_dir, accelerator).drop_after(state.step)
    return state, checkpoints
