"""Shared pieces of the benchmark scripts: machine description, timing, autocast, Markdown tables.

The scripts live in bench/ and are run from the repository root (`python bench/sample_speed.py`): Python puts
bench/ on sys.path itself, so they import this module as `common`; the toolkit's packages are pip-installed.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import statistics
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]  # where the scripts that the benchmarks run as subprocesses live


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, or what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_line(device: torch.device) -> str:
    """One Markdown line describing where the figures come from."""
    parts = [f"CPU {cpu_model()} ({usable_cores()} cores usable)", f"torch {torch.__version__}",
             f"{torch.get_num_threads()} intra-op threads", f"device {device.type}"]
    if device.type == "cuda":
        parts[-1] += f" ({torch.cuda.get_device_name(device)})"
    parts.append(f"Python {platform.python_version()}")
    return "Machine: " + ", ".join(parts)


def pick_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU")
    return device


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times cover it; nothing to do on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on a GPU (what the cifar10 presets train with); plain fp32 on the CPU."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def time_call(fn, device: torch.device, *, repeats: int, warmup: int = 1, budget_s: float | None = None) -> list[float]:
    """Wall-clock seconds of `fn()` over `repeats` runs after `warmup` unmeasured ones.

    With `budget_s`, stop repeating once the measured runs have used that much time (at least one run is
    measured), so that slow settings are not repeated as often as fast ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        if budget_s is not None and sum(times) >= budget_s:
            break
    return times


def median(values) -> float:
    return statistics.median(values)


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    """Measured throughput of one large square matmul, GFLOP/s (the machine's practical peak for dense work)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_call(lambda: a @ b, device, repeats=repeats, warmup=2)
    return 2 * n**3 / min(times) / 1e9  # best run: the peak, not the noise


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub Markdown table; floats are expected to be formatted by the caller."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: float, digits: int = 3) -> str:
    """A number with `digits` significant figures, fixed-point (no exponent) for table cells."""
    if x is None or not math.isfinite(x):
        return "nan"
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def verdict(name: str, passed: bool, detail: str) -> str:
    return f"- {'PASS' if passed else 'FAIL'}: {name}: {detail}"


def release_memory() -> None:
    """Give freed heap back to the OS (glibc), so that the next RSS baseline is not inflated by the previous run."""
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every `interval` s by a background thread.

    torch's CPU allocations bypass tracemalloc and ru_maxrss only ever grows over a process's life, so this samples
    /proc/self/statm instead. Short spikes between samples can be missed: it is a lower bound."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        release_memory()
        self.base = rss_bytes()
        self.peak = self.base
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta(self) -> int:
        return self.peak - self.base
