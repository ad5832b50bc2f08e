"""Compare the two tokenizer bottlenecks, VectorQuantize ("vq") and FSQ, at equal steps and comparable codebook size.

Trains a preset (default `tiny`) once per quantizer on the built-in `shapes` set and, with --data, on a folder of
images too, each run through train_vq.py's own code (`vqvae.train.main`, in-process, into a temporary run folder,
on the CPU, evaluated once at the end); then prints the held-out PSNR, codebook usage and perplexity that the run
wrote to its metrics.jsonl, and the training time. Example (a few CPU minutes):

    python bench/vq_quantizers.py --steps 600 --data path/to/images --threads 1
    python bench/vq_quantizers.py --quick --threads 1     # seconds: a smoke test
"""

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import vqvae.train
from vqvae.config import VQ_PRESETS

QUICK_STEPS, QUICK_EVAL_IMAGES = 4, 32


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    p.add_argument("--data", default=None, help="a folder of images, benchmarked after `shapes`")
    p.add_argument("--no-shapes", action="store_true", help="skip the built-in shapes set")
    p.add_argument("--preset", default="tiny", choices=sorted(VQ_PRESETS))
    p.add_argument("--codebook-size", type=int, default=None, help="codes of the vq run (default: the preset's)")
    p.add_argument("--fsq-levels", default=None,
                   help="levels of the fsq run, e.g. 8,8,8 = 512 codes (default: the preset's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--work", type=Path, help="keep the run folders here (default: a temporary folder, removed)")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_STEPS} steps of batch 8, {QUICK_EVAL_IMAGES} held-out images: a smoke test")
    return p.parse_args(argv)


def quantizer_args(args, base_model) -> dict[str, list[str]]:
    """train_vq.py arguments that pick each quantizer."""
    levels = args.fsq_levels.split(",") if args.fsq_levels else [str(level) for level in base_model.fsq_levels]
    return {
        "vq": ["--quantizer", "vq", "--codebook-size", str(args.codebook_size or base_model.codebook_size)],
        "fsq": ["--quantizer", "fsq", "--fsq-levels", *levels],
    }


def train_run(out: Path, source: str, preset: str, extra: list[str]) -> tuple[dict, dict, float]:
    """`train_vq.py --data SOURCE --preset PRESET --out OUT --cpu EXTRA...` in-process, its output in OUT/train.log.

    Returns the last metrics record, the run's config.json and the wall seconds of the whole call."""
    out.mkdir(parents=True, exist_ok=True)
    argv = ["--data", source, "--preset", preset, "--out", str(out), "--cpu", *extra]
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        vqvae.train.main(argv)
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return records[-1], json.loads((out / "config.json").read_text()), seconds


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base_model, base_train = VQ_PRESETS[args.preset]
    steps = QUICK_STEPS if args.quick else args.steps
    # one evaluation and one checkpoint, at the end: the recorded training time is training only
    common = ["--steps", str(steps), "--eval-every", str(steps), "--save-every", str(steps), "--num-workers", "0"]
    if args.quick:
        common += ["--batch-size", "8", "--num-eval-images", str(QUICK_EVAL_IMAGES), "--warmup-steps", "1",
                   "--kmeans-iters", "2"]
    runs = quantizer_args(args, base_model)
    sources = ([] if args.no_shapes else ["shapes"]) + ([args.data] if args.data else [])
    if not sources:
        sys.exit("nothing to benchmark: drop --no-shapes or give --data")

    batch = 8 if args.quick else base_train.batch_size
    print(f"preset {args.preset}, {steps} steps x batch {batch}, lr {base_train.lr}, {torch.get_num_threads()} "
          f"threads; each run is train_vq.py's own loop (vqvae.train.main), random flips included")
    rows, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vq_quantizers-") as tmp:
        work = args.work or Path(tmp)
        for source in sources:
            print(f"\n{source}", flush=True)
            for name, extra in runs.items():
                out = work / f"{Path(source).name}_{name}"
                shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resumed or refused one
                last, config, seconds = train_run(out, source, args.preset, common + extra)
                size = (config["model"]["codebook_size"] if name == "vq"
                        else int(torch.tensor(config["model"]["fsq_levels"]).prod()))
                train_s = last.get("wall_time_s") or seconds
                row = dict(source=source, name=name, size=size, psnr=last["psnr"], usage=last["codebook_usage"],
                           perplexity=last["perplexity"], eval_images=last["num_images"], train_s=train_s,
                           per_step=train_s / steps, total_s=seconds)
                rows.append(row)
                print(f"  {name:>3}: PSNR {row['psnr']:5.2f} dB  usage {row['usage']:6.1%}  perplexity "
                      f"{row['perplexity']:6.1f}  ({train_s:.0f} s training, {row['per_step'] * 1000:.0f} ms/step; "
                      f"{seconds:.0f} s with loading, evaluation and checkpoint)", flush=True)

    print("\n| data | quantizer | codes | held-out PSNR (dB) | usage | perplexity | held-out images | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['source']} | {r['name']} | {r['size']} | {r['psnr']:.2f} | {r['usage']:.1%} | "
              f"{r['perplexity']:.1f} | {r['eval_images']} | {r['train_s']:.1f} |")
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
