"""Metrics: one JSON line per evaluation in RUN_DIR/metrics.jsonl, forwarded to accelerate's trackers."""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path

import torch

from .runs import METRICS_NAME, atomic_write_text, reporting_disk_full


class MetricsLog:
    """Appends one JSON object per call to RUN_DIR/metrics.jsonl and forwards it to accelerate's trackers."""

    def __init__(self, run_dir, accelerator):
        self.path = Path(run_dir) / METRICS_NAME
        self.accelerator = accelerator

    def drop_after(self, step: int) -> None:
        """Forget records past `step`: a resumed run rewrites them (main process only)."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        kept, torn = [], []
        for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a crash or a full disk
                torn.append(number)
                continue
            if not isinstance(record, dict):
                torn.append(number)
            elif not isinstance(record.get("step", 0), int) or record.get("step", 0) <= step:
                kept.append(line)
        if torn:
            warnings.warn(f"{self.path}: dropping {len(torn)} unreadable line(s) (line {', '.join(map(str, torn[:5]))}"
                          f"{', ...' if len(torn) > 5 else ''}), cut short when the run stopped", stacklevel=2)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        record = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        # strict JSON has no NaN/inf: a non-finite value is written as null
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        if self.accelerator.is_main_process:
            with reporting_disk_full(str(self.path), "the metrics logged before are kept"):
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
