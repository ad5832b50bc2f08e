"""Data loading at scale: memory and start-up time against the number of images, loader speed, token-cache encoding.

    python bench/data_speed.py                          # 1k, 10k and 50k JPEG photos at 256 px
    python bench/data_speed.py --sizes 1000 10000       # fewer sizes
    python bench/data_speed.py --quick                  # a smoke test (seconds to a minute)

It writes its own folders of JPEG photos (random sizes 256-384 px, smooth colours, shapes and grain, 10 class
folders; reused from --root between runs; smaller sizes are hard links to the first images of the largest) and
measures, each in a fresh subprocess that runs the real `vqvae.train.main` / `maskgit.train.main` up to the end
of its first optimizer step (the step function is wrapped to report and stop):

- peak RSS of the training process (ru_maxrss) and of its DataLoader workers (VmHWM), and the time from the
  process start to the end of the first step, for stage 1 (streaming, 2 workers) and stage 2 (token cache warm:
  built beforehand by a cold run, whose time is reported too);
- loader images/s with 0, 1 and 2 workers (`core.data.train_loader` over the real dataset, uint8 batches of 32)
  against a bare loop of PIL open + draft + ADM resize/crop over the same files in one process (the ceiling per
  worker), page cache warm; the four are timed in turn for --loader-rounds rounds and each keeps its best round,
  so that a machine whose speed drifts during the bench (a shared host) moves all four alike. Beside them, the
  same loader over one ready-made image served again and again (no decoding): what passing batches from the
  workers to the training process costs;
- token-cache encoding (`maskgit.token_cache.encoded_splits`) of the smallest folder by 1 process and by 2
  (`accelerate launch --multi_gpu --num_processes 2`, gloo on the CPU), against the tokenizer alone (`vq.encode`
  of both views of random batches in this process: the ceiling of one process); 1 and 2 processes take turns
  for --encode-rounds rounds, each keeping its fastest.

Targets (PASS/FAIL): peak RSS growth smallest -> largest <= 10%; time to first step smallest -> largest <= 2x;
loader >= 90% of the bare loop per worker; 2-process encode >= 1.7x one process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the toolkit, when it is not pip-installed

import numpy as np

from common import REPO, fmt, markdown_table, usable_cores

import torch  # noqa: E402  (after common, which puts the repo on sys.path)

# a narrow tokenizer, so that training steps cost little next to the data (the subject here is the data path, not
# models); encoding is another matter: 0.39 GFLOP per 256-px view (8 channels at full resolution), ~30 ms a view
# on one core, 20x the ~3 ms decode of an image, so the encode is timed against the tokenizer alone (docs/data.md)
TINY_VQ = ["--channels", "8", "--max-channels", "16", "--norm-groups", "4", "--num-res-blocks", "1",
           "--latent-dim", "4", "--codebook-size", "64", "--kmeans-iters", "1", "--warmup-steps", "1",
           "--batch-size", "8", "--num-eval-images", "8"]
TINY_MASKGIT = ["--dim", "32", "--depth", "1", "--heads", "2", "--batch-size", "8", "--num-eval-images", "8",
                "--num-sample-images", "4", "--warmup-steps", "1"]
CHILD = r"""
import json, os, resource, sys, time
T0 = float(os.environ["BENCH_T0"])
stage, argv = sys.argv[1], sys.argv[2:]
import importlib
mod = importlib.import_module(stage + ".train")

def workers_hwm():
    out = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            if int(fields[1]) != os.getpid():
                continue
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmHWM:"):
                    out = max(out, int(line.split()[1]) * 1024)
        except (OSError, IndexError, ValueError):
            pass
    return out

class FirstStep(Exception):
    pass

real = mod.update_step

def first_step(*args, **kwargs):
    out = real(*args, **kwargs)
    print("BENCH " + json.dumps({"first_step_s": time.time() - T0,
                                 "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                 "workers_rss": workers_hwm()}), flush=True)
    raise FirstStep

mod.update_step = first_step
try:
    mod.main(argv)
except FirstStep:
    pass
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 50_000], help="images per folder")
    p.add_argument("--image-size", type=int, default=256, help="training resolution")
    p.add_argument("--root", type=Path, default=Path("/tmp/maskgit_data_speed"), help="where the folders are made")
    p.add_argument("--loader-images", type=int, default=1024, help="images per loader throughput measurement")
    p.add_argument("--loader-rounds", type=int, default=3,
                   help="rounds of the bare-loop and loader timings, taken in turn; each keeps its best")
    p.add_argument("--encode-rounds", type=int, default=2,
                   help="rounds of the 1- and 2-process encodes, taken in turn; each keeps its fastest")
    p.add_argument("--encode-size", type=int, default=None,
                   help="folder size for the encode timing (default: the smallest)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the first-step runs")
    p.add_argument("--quick", action="store_true", help="tiny folders at 64 px: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.image_size, args.loader_images = [60, 120], 64, 64
        args.loader_rounds = args.encode_rounds = 1
        args.root = args.root.with_name(args.root.name + "_quick")
    args.sizes = sorted(set(args.sizes))
    return args


# ----------------------------------------------------------------------------- the photo folders

def photo(rng: np.random.Generator, size: int):
    """A photo-like JPEG subject: a smooth two-colour gradient, a few soft shapes and sensor grain."""
    from PIL import Image, ImageDraw, ImageFilter

    w, h = (int(v) for v in rng.integers(size, size * 3 // 2 + 1, 2))
    a, b = rng.integers(0, 256, (2, 3))
    t = np.linspace(0, 1, w)[None, :, None] * rng.uniform(0.3, 1) + np.linspace(0, 1, h)[:, None, None] * 0.5
    base = (a + (b - a) * np.clip(t, 0, 1)).astype(np.uint8)
    im = Image.fromarray(np.broadcast_to(base, (h, w, 3)).copy())
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        r = int(rng.integers(size // 10, size // 3))
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    im = im.filter(ImageFilter.GaussianBlur(2))
    grain = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(im) + grain, 0, 255).astype(np.uint8))


def make_folders(root: Path, sizes: list[int], image_size: int) -> dict[int, Path]:
    """root/pool holds max(sizes) JPEGs (made once, reused); root/nN links the first N of them."""
    pool = root / f"pool{image_size}"
    pool.mkdir(parents=True, exist_ok=True)
    have = len(list(pool.iterdir()))
    need = max(sizes)
    if have < need:
        print(f"writing {need - have} JPEG photos to {pool} ...", file=sys.stderr, flush=True)
        for i in range(have, need):
            photo(np.random.default_rng(i), image_size).save(pool / f"{i:07d}.jpg", quality=90)
    folders = {}
    for n in sizes:
        folder = root / f"n{n}_{image_size}"
        if not folder.is_dir() or sum(len(os.listdir(folder / d)) for d in os.listdir(folder)) != n:
            shutil.rmtree(folder, ignore_errors=True)
            for i in range(n):
                cls = folder / f"class_{i % 10}"
                cls.mkdir(parents=True, exist_ok=True)
                os.link(pool / f"{i:07d}.jpg", cls / f"{i:07d}.jpg")
        folders[n] = folder
    return folders


# ----------------------------------------------------------------------------- subprocess measurements

def env(extra: dict | None = None) -> dict:
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), out.get("PYTHONPATH")) if p)
    out.setdefault("OMP_NUM_THREADS", "1")
    out.update(extra or {})
    return out


def first_step(stage: str, argv: list[str], extra_env: dict | None = None) -> dict:
    """Run `stage`.train.main(argv) in a fresh process up to its first step; its BENCH record."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, stage, *map(str, argv)], cwd=REPO, capture_output=True,
                          text=True, env=env({"BENCH_T0": repr(start), **(extra_env or {})}), timeout=3600)
    records = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if not records:
        raise SystemExit(f"error: {stage} did not reach its first step (exit {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    return records[0]


def train_tokenizer(folder: Path, out: Path, image_size: int) -> None:
    """A 1-step tokenizer at `image_size` (16x16 codes at 256 px), for stage 2's measurements."""
    if (out / "model.safetensors").is_file():
        return
    shutil.rmtree(out, ignore_errors=True)
    down = "16" if image_size >= 128 else "4"
    proc = subprocess.run([sys.executable, "train_vq.py", "--data", str(folder), "--image-size", str(image_size),
                           "--downsample", down, *TINY_VQ, "--steps", "1", "--save-every", "1", "--eval-every", "1",
                           "--num-workers", "0", "--image-cache", "off", "--out", str(out)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise SystemExit(f"error: the tokenizer run failed:\n{proc.stderr[-3000:]}")


ENCODE_CHILD = r"""
import json, sys, time
from core.accel import make_accelerator
from maskgit.token_cache import encoded_splits
from vqvae import load_tokenizer
vq_run, folder, cache, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
acc = make_accelerator(cache, cpu=True)
vq = load_tokenizer(vq_run)
data = {"vq_run": vq_run, "data": folder, "data_root": None, "image_size": size}
start = time.perf_counter()
codes = encoded_splits(acc, vq, data, cache, views="flip", num_workers=0, loader_options={"image_cache": "off"})
acc.wait_for_everyone()
if acc.is_main_process:
    print("BENCH " + json.dumps({"encode_s": time.perf_counter() - start, "items": len(codes[0]) + len(codes[2])}))
"""


def forward_time(vq_run: Path, image_size: int, images: int) -> dict:
    """The encode's ceiling: `vq.encode` of both flip views of random batches of the encode's batch size."""
    from maskgit.token_cache import encode_batch_size, make_views
    from vqvae import load_tokenizer

    vq = load_tokenizer(vq_run)
    batch = torch.rand(encode_batch_size(image_size), 3, image_size, image_size) * 2 - 1
    vq.encode(batch)  # first-call set-up is not throughput
    start, count = time.perf_counter(), 0
    while count < images:
        for view in make_views(batch, "flip", image_size):
            vq.encode(view)
        count += len(batch)
    return {"encode_s": time.perf_counter() - start, "items": count}


def fastest(best: dict | None, record: dict) -> dict:
    return record if best is None or record["encode_s"] < best["encode_s"] else best


def encode_time(vq_run: Path, folder: Path, cache: Path, image_size: int, processes: int) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    launch = ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"] if processes > 1
              else [sys.executable])
    script = cache.with_suffix(".py")
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(ENCODE_CHILD)
    proc = subprocess.run([*launch, str(script), str(vq_run), str(folder), str(cache), str(image_size)], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=3600)
    records = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if not records:
        raise SystemExit(f"error: encoding with {processes} process(es) failed:\n{proc.stderr[-3000:]}")
    return records[0]


# ----------------------------------------------------------------------------- in-process loader throughput

def bare_loop(paths: list[Path], size: int) -> float:
    """Images/s of the ceiling: PIL open, draft, RGB, ADM resize + centre crop, to a numpy array."""
    from PIL import Image

    from core.data import center_crop_arr

    start = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            im.draft("RGB", (size, size))
            im = im.convert("RGB")
        np.asarray(center_crop_arr(im, size))
    return len(paths) / (time.perf_counter() - start)


def loader_rate(dataset, images: int, workers: int, batch: int = 32) -> float:
    from core.data import train_loader
    from core.order import StepBatchSampler

    steps = max(2, images // batch)
    sampler = StepBatchSampler(len(dataset), batch, seed=0, rank=0, world_size=1, total_steps=steps + 1)
    loader = train_loader(dataset, sampler, num_workers=workers, pin_memory=False, seed=0)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    count = sum(len(x) for x, _ in it)
    rate = count / (time.perf_counter() - start)
    del it
    return rate


class ReadyImages:
    """`n` items of one ready-made uint8 (S, S, 3) image: `train_loader` over it times the loader's own transport."""

    def __init__(self, n: int, size: int):
        self.n, self.pixels = n, np.zeros((size, size, 3), np.uint8)

    def __len__(self) -> int:
        return self.n

    def train_item(self, key):
        return self.pixels, 0


# ----------------------------------------------------------------------------- the report

def verdict(name: str, value: float, target: float, higher_is_better: bool, unit: str = "x") -> str:
    ok = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    return f"- {'PASS' if ok else 'FAIL'}: {name} {sign} {fmt(target)}{unit}: {fmt(value)}{unit}"


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    folders = make_folders(args.root, args.sizes, args.image_size)
    size = args.image_size
    small, large = min(args.sizes), max(args.sizes)
    cache_env = {"MASKGIT_IMAGE_CACHE_DIR": str(args.root / "image_cache")}
    print(f"Machine: {usable_cores()} CPU cores usable, torch {torch.__version__}; photos {size}-{size * 3 // 2} px "
          f"JPEG q90, training at {size} px; sizes {', '.join(map(str, args.sizes))}", flush=True)

    vq_run = args.root / f"vq{size}"
    train_tokenizer(folders[small], vq_run, size)
    down = "16" if size >= 128 else "4"
    rows, stage1, stage2 = [], {}, {}
    for n, folder in folders.items():
        out = args.root / "runs" / f"vq_n{n}"
        shutil.rmtree(out, ignore_errors=True)
        stage1[n] = first_step("vqvae", ["--data", folder, "--image-size", size, "--downsample", down, *TINY_VQ,
                                         "--steps", "2", "--save-every", "1000", "--eval-every", "1000",
                                         "--num-workers", args.workers, "--image-cache", "off", "--out", out],
                               cache_env)
        cache = args.root / "token_cache" / f"n{n}"
        shutil.rmtree(cache, ignore_errors=True)
        mg = ["--vq", vq_run, "--data", folder, *TINY_MASKGIT, "--steps", "2", "--eval-every", "1000",
              "--sample-every", "1000", "--save-every", "1000", "--num-workers", args.workers,
              "--image-cache", "off", "--cache-dir", cache]
        for kind in ("cold", "warm"):
            out = args.root / "runs" / f"mg_n{n}_{kind}"
            shutil.rmtree(out, ignore_errors=True)
            stage2[n, kind] = first_step("maskgit", [*mg, "--out", out], cache_env)
        rows.append([n, fmt(stage1[n]["peak_rss"] / 2**20), fmt(stage1[n]["workers_rss"] / 2**20),
                     fmt(stage1[n]["first_step_s"]), fmt(stage2[n, "warm"]["peak_rss"] / 2**20),
                     fmt(stage2[n, "warm"]["first_step_s"]), fmt(stage2[n, "cold"]["first_step_s"])])
        print(f"measured {n} images", file=sys.stderr, flush=True)
    print("\n" + markdown_table(
        ["images", "stage 1 peak RSS (MiB)", "stage 1 worker peak RSS (MiB)", "stage 1 first step (s)",
         "stage 2 peak RSS (MiB)", "stage 2 first step, warm cache (s)", "stage 2 first step, cold: encode (s)"],
        rows))

    from core.data import load_dataset

    dataset = load_dataset(str(folders[small]), size, "train", image_cache="off")
    paths = [folders[small] / p for p in dataset.paths][: args.loader_images]
    bare_loop(paths, size)  # warm the page cache
    bare, loader, transport = 0.0, dict.fromkeys((0, 1, 2), 0.0), dict.fromkeys((0, 1, 2), 0.0)
    ready = ReadyImages(4 * args.loader_images, size)
    for _ in range(max(1, args.loader_rounds)):  # in turn, best of each: drift moves them all alike
        bare = max(bare, bare_loop(paths, size))
        for w in loader:
            loader[w] = max(loader[w], loader_rate(dataset, min(args.loader_images, len(dataset)), w))
            transport[w] = max(transport[w], loader_rate(ready, len(ready), w))
    print("\n" + markdown_table(["loader", "images/s", "per worker vs bare loop"],
                                [["bare PIL loop (1 process)", fmt(bare), "1.00"]]
                                + [[f"train_loader, {w} workers", fmt(r), fmt(r / (bare * max(1, w)))]
                                   for w, r in loader.items()]))
    print("\n" + markdown_table(["train_loader over a ready-made image (no decoding)", "images/s",
                                 "ms an image, per worker", "share of a bare-loop decode"],
                                [[f"{w} workers", fmt(r), fmt(1e3 * max(1, w) / r),
                                  f"{100 * bare * max(1, w) / r:.1f}%"] for w, r in transport.items()]))

    encode_n = args.encode_size or small
    if encode_n not in folders:
        folders.update(make_folders(args.root, [encode_n], size))
    one = two = None
    for _ in range(max(1, args.encode_rounds)):  # in turn, fastest of each, as for the loader
        one = fastest(one, encode_time(vq_run, folders[encode_n], args.root / "encode" / "p1", size, 1))
        two = fastest(two, encode_time(vq_run, folders[encode_n], args.root / "encode" / "p2", size, 2))
    alone = forward_time(vq_run, size, min(64, one["items"]))
    print("\n" + markdown_table(["token-cache encode", "items", "seconds", "items/s"],
                                [[name, r["items"], fmt(r["encode_s"]), fmt(r["items"] / r["encode_s"])]
                                 for name, r in (("1 process", one), ("2 processes", two),
                                                 ("tokenizer alone, 1 process (2 views)", alone))]))

    print()
    for stage, table in (("stage 1", {n: stage1[n] for n in args.sizes}),
                         ("stage 2", {n: stage2[n, "warm"] for n in args.sizes})):
        growth = table[large]["peak_rss"] / table[small]["peak_rss"] - 1
        print(verdict(f"{stage} peak RSS growth {small} -> {large} images", 100 * growth, 10, False, "%"))
        ratio = table[large]["first_step_s"] / table[small]["first_step_s"]
        print(verdict(f"{stage} time to first step {large} / {small} images", ratio, 2, False))
    for w in (1, 2):
        print(verdict(f"loader with {w} worker(s) per worker vs the bare loop", 100 * loader[w] / (bare * w), 90,
                      True, "%"))
    print(verdict("2-process token-cache encode speed-up", one["encode_s"] / two["encode_s"], 1.7, True))


if __name__ == "__main__":
    main()
