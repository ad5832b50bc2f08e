"""What the VQGAN objective buys a small tokenizer on real photographs at 64 px: MSE only against + adversarial
(and + LPIPS where its weights are on this machine), with the same steps, data, model and seed.

Each variant is one run of the real `train_vq.py` (a subprocess, OMP_NUM_THREADS=--threads, on the CPU, the `tiny`
preset at --image-size with --downsample), evaluated once at its last step. Then every trained tokenizer
(`vqvae.load_tokenizer`) reconstructs the whole held-out split of the folder (`core.data.load_dataset(..., "test")`)
and the script prints one Markdown row per variant:

* PSNR and SSIM (`vqvae.metrics`), means over held-out images;
* sharpness: high-frequency energy of the reconstructions over that of the originals (`sharpness()`): the
  high-frequency part of an image is the image minus its 3x3 box blur (reflect padding, each channel, [0, 1]
  scale), its energy the mean square. 1.0 = as much fine detail as the originals, < 1 blurrier. It measures the
  amount of detail, not its correctness: invented texture or artefacts also raise it;
* codebook usage and perplexity of the held-out codes (`vqvae.metrics.codebook_stats`); LPIPS when present;
* training time: wall ms/step (metrics.jsonl's `wall_time_s` / steps: the loop only, shared-machine noise
  included) and CPU ms/step (the child's user + system CPU seconds / steps, from getrusage(RUSAGE_CHILDREN):
  start-up and the final evaluation included).

The differences to the `mse` row come with 95% intervals from a paired bootstrap over held-out images: they
show the spread from which images were held out, not from the training seed (one seed per variant).

Data: by default a folder of crops of ~20 photographs that scikit-image / scikit-learn ship (bench/make_photos.py;
not a diverse dataset, held-out crops are new views of the same scenes). Example (~25 minutes on 2 busy cores):

    python bench/vq_gan.py --steps 1000 --threads 1 --work runs/vq_gan
    python bench/vq_gan.py --quick --threads 1     # seconds: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import REPO, fmt, machine_line, markdown_table

QUICK = dict(steps=6, batch_size=8, num_photos=160, disc_start=2)
SEED = 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per variant (the same for all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS and torch threads of each run")
    p.add_argument("--work", type=Path, help="keep runs (and the made photo folder) here; default: a temporary "
                                             "folder, removed at the end")
    p.add_argument("--data", help="a folder of images (default: make one with bench/make_photos.py in --work)")
    p.add_argument("--num-photos", type=int, default=3000, help="crops to make when --data is not given")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--downsample", type=int, default=4, help="f: 64 px -> 16x16 codes at f=4")
    p.add_argument("--disc-weight", type=float, default=0.5)
    p.add_argument("--disc-start-frac", type=float, default=0.4, help="the discriminator starts at this share "
                                                                      "of the steps")
    p.add_argument("--disc-channels", type=int, default=32,
                   help="PatchGAN width (taming: 64; 32 keeps D's cost near the tiny tokenizer's on a CPU)")
    p.add_argument("--disc-layers", type=int, default=2, help="PatchGAN stride-2 layers (2: 34 px patches)")
    p.add_argument("--perceptual-weights", help="LPIPS weights (folder or file); default: torch hub's cache. "
                                                "The +lpips variant runs only when they are present")
    p.add_argument("--quick", action="store_true", help=f"{QUICK['steps']} steps of batch {QUICK['batch_size']} on "
                                                        f"{QUICK['num_photos']} crops: a smoke test")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- measures

def high_freq_energy(images: torch.Tensor) -> torch.Tensor:
    """Per image (b,): mean square of the image minus its 3x3 box blur, on the [0, 1] scale.

    `images` (b, c, H, W) in [-1, 1], clamped first (what would be saved as pixels); reflect padding, so a constant
    image has exactly zero energy and a pixel checkerboard of amplitude a has (8a/9)^2 everywhere."""
    x = images.float().clamp(-1, 1) * 0.5 + 0.5
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3, stride=1)
    return ((x - blurred) ** 2).flatten(1).mean(1)


def sharpness(recon: torch.Tensor, originals: torch.Tensor) -> float:
    """High-frequency energy of the reconstructions over that of the originals, summed over images (a ratio of
    totals, so a flat image with almost no detail cannot dominate): 1.0 as sharp as the originals, < 1 blurrier."""
    return (high_freq_energy(recon).sum() / high_freq_energy(originals).sum()).item()


def per_image_psnr(recon, originals) -> torch.Tensor:
    from vqvae.metrics import psnr

    return torch.tensor([psnr(r[None], o[None]) for r, o in zip(recon, originals)])


def per_image_ssim(recon, originals) -> torch.Tensor:
    from vqvae.metrics import ssim

    return torch.tensor([ssim(r[None], o[None]) for r, o in zip(recon, originals)])


def bootstrap_diff(stat, a: dict, b: dict, n: int, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% interval of stat(b) - stat(a) over paired resamples of the held-out images; `stat(d, idx)` reads the
    per-image tensors of one variant (`d`) at indices `idx`."""
    g = torch.Generator().manual_seed(seed)
    diffs = []
    for _ in range(resamples):
        idx = torch.randint(0, n, (n,), generator=g)
        diffs.append(stat(b, idx) - stat(a, idx))
    diffs = torch.tensor(diffs)
    return diffs.quantile(0.025).item(), diffs.quantile(0.975).item()


STATS = {  # name -> (per-variant statistic over a subset of held-out images, unit, format digits)
    "PSNR": (lambda d, i: d["psnr_i"][i].mean().item(), " dB", 2),
    "SSIM": (lambda d, i: d["ssim_i"][i].mean().item(), "", 3),
    "sharpness": (lambda d, i: (d["hf_recon"][i].sum() / d["hf_orig"][i].sum()).item(), "", 3),
}


@torch.no_grad()
def evaluate(run_dir: Path, images: torch.Tensor, perceptual=None) -> dict:
    """Held-out measures of the tokenizer trained in `run_dir` on `images` (n, 3, H, W) in [-1, 1]."""
    from vqvae import load_tokenizer
    from vqvae.metrics import codebook_stats, psnr, ssim

    model = load_tokenizer(run_dir)
    recon, codes = [], []
    for chunk in images.split(64):
        out = model(chunk)
        recon.append(out.recon.float().clamp(-1, 1))
        codes.append(out.codes)
    recon, codes = torch.cat(recon), torch.cat(codes)
    usage, perplexity = codebook_stats(codes, model.codebook_size)
    result = {"psnr": psnr(recon, images), "ssim": ssim(recon, images), "sharpness": sharpness(recon, images),
              "codebook_usage": usage, "perplexity": perplexity, "codebook_size": model.codebook_size,
              "psnr_i": per_image_psnr(recon, images), "ssim_i": per_image_ssim(recon, images),
              "hf_recon": high_freq_energy(recon), "hf_orig": high_freq_energy(images), "recon": recon}
    if perceptual is not None:
        result["lpips"] = torch.cat([perceptual(r, i, reduction="none") for r, i in
                                     zip(recon.split(64), images.split(64))]).mean().item()
    return result


# ---------------------------------------------------------------------------------------------------- runs

def variants(args, lpips_present: bool, steps: int) -> dict[str, list[str]]:
    """train_vq.py arguments of each variant, on top of the shared ones."""
    start = max(1, round(args.disc_start_frac * steps))
    gan = ["--disc-weight", str(args.disc_weight), "--disc-start", str(start), "--disc-adaptive", "true",
           "--disc-loss", "hinge", "--disc-channels", str(args.disc_channels), "--disc-layers", str(args.disc_layers)]
    out = {"mse": [], "mse+gan": gan}
    if lpips_present:
        weights = ["--perceptual-weights", args.perceptual_weights] if args.perceptual_weights else []
        out["mse+lpips+gan"] = ["--perceptual-weight", "1.0", *weights, *gan]
    return out


def train_run(out: Path, argv: list[str], threads: int) -> tuple[list[dict], float, float]:
    """`python train_vq.py ARGV` in a subprocess, its output in OUT.log. Returns its metrics records, the wall
    seconds of the whole process and its CPU seconds (user + system)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("MASKGIT_IMAGE_CACHE_DIR", str(out.parent / "image_cache"))  # not the user's cache
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.run([sys.executable, str(REPO / "train_vq.py"), *argv], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = (out.parent / f"{out.name}.log").read_text()[-3000:]
        raise SystemExit(f"error: train_vq.py failed (exit {proc.returncode}) for {out.name}:\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return records, wall, cpu


def held_out_images(folder: str, size: int) -> torch.Tensor:
    from core.data import load_dataset

    test = load_dataset(folder, size, "test")
    return torch.stack([test[i][0] for i in range(len(test))])


# ---------------------------------------------------------------------------------------------------- report

def verdicts(rows: dict[str, dict], n: int) -> list[str]:
    """One line per metric: what each variant changed against `mse`, with bootstrap intervals where per-image."""
    base = rows["mse"]
    lines = []
    for name in [v for v in rows if v != "mse"]:
        r = rows[name]
        for metric, (stat, unit, digits) in STATS.items():
            lo, hi = bootstrap_diff(stat, base, r, n)
            a, b = stat(base, slice(None)), stat(r, slice(None))
            sign = "higher" if lo > 0 else "lower" if hi < 0 else "no clear change"
            lines.append(f"- {metric}: {name} {b - a:+.{digits}f}{unit} ({a:.{digits}f} -> {b:.{digits}f}; 95% "
                         f"interval over held-out images [{lo:+.{digits}f}, {hi:+.{digits}f}]): {sign}")
        if "lpips" in r and "lpips" in base:
            lines.append(f"- LPIPS: {name} {r['lpips'] - base['lpips']:+.3f} ({base['lpips']:.3f} -> "
                         f"{r['lpips']:.3f}; lower is closer)")
        lines.append(f"- codebook: {name} usage {base['codebook_usage']:.1%} -> {r['codebook_usage']:.1%}, "
                     f"perplexity {base['perplexity']:.1f} -> {r['perplexity']:.1f} (of {r['codebook_size']} codes)")
        wall, cpu = r["wall_ms"] / base["wall_ms"], r["cpu_ms"] / base["cpu_ms"]
        s, steps = r["disc_start"], r["steps"]
        # the GAN's overhead only applies from disc_start on: per-step cost there, from the whole-run CPU time
        during = (r["cpu_ms"] * steps - base["cpu_ms"] * s) / max(1, steps - s) / base["cpu_ms"]
        lines.append(f"- time: {name} costs {wall:.2f}x the wall time and {cpu:.2f}x the CPU time per step of mse "
                     f"over the whole run; ~{during:.1f}x CPU per step once the discriminator trains (from step {s})")
    return lines


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = QUICK["steps"] if args.quick else args.steps
    batch = QUICK["batch_size"] if args.quick else args.batch_size
    total_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="vq_gan-") if args.work is None else None
    work = Path(tmp.name) if tmp else args.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.data:
            data = str(Path(args.data).resolve())
        else:
            from make_photos import make_photos

            num = QUICK["num_photos"] if args.quick else args.num_photos
            folder = work / f"photos{args.image_size}"
            names = make_photos(folder, args.image_size, num, seed=SEED)
            data = str(folder.resolve())
            print(f"data: {num} crops of {args.image_size} px from {len(names)} bundled photographs "
                  f"(bench/make_photos.py) in {folder}")
        images = held_out_images(data, args.image_size)

        from vqvae.objective import perceptual_if_present

        perceptual = perceptual_if_present(args.perceptual_weights)
        runs = variants(args, perceptual is not None, steps)
        if perceptual is None:
            print("mse+lpips+gan: skipped (no LPIPS/VGG16 weights on this machine: give --perceptual-weights or "
                  "put vgg16-397923af.pth in torch hub's cache)")

        shared = ["--data", data, "--preset", "tiny", "--cpu", "--image-size", str(args.image_size),
                  "--downsample", str(args.downsample), "--steps", str(steps), "--batch-size", str(batch),
                  "--seed", str(SEED), "--eval-every", str(steps), "--save-every", str(steps),
                  "--num-eval-images", str(len(images)), "--num-workers", "0"]
        if args.quick:
            shared += ["--warmup-steps", "1"]
        print(machine_line(torch.device("cpu")))
        print("command: python bench/vq_gan.py " + shlex.join(sys.argv[1:] if argv is None else argv))
        print(f"each variant: python train_vq.py {shlex.join(shared)} --out RUN [variant flags]; "
              f"OMP_NUM_THREADS={args.threads}; {len(images)} held-out images\n", flush=True)

        rows = {}
        for name, extra in runs.items():
            out = work / name.replace("+", "_")
            shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resumed or refused one
            print(f"{name}: train_vq.py ... {shlex.join(extra)}", flush=True)
            records, wall, cpu = train_run(out, [*shared, "--out", str(out), *extra], args.threads)
            last = records[-1]
            row = evaluate(out, images, perceptual)
            row |= {"steps": steps, "wall_ms": 1e3 * last["wall_time_s"] / steps, "cpu_ms": 1e3 * cpu / steps,
                    "process_s": wall, "last": last,
                    "disc_start": int(extra[extra.index("--disc-start") + 1]) if "--disc-start" in extra else steps}
            rows[name] = row
            train_keys = [k for k in ("loss", "recon_loss", "gan", "gan_weight", "disc_total") if k in last]
            print(f"  {wall:.0f} s; held-out PSNR {row['psnr']:.2f} dB (train_vq.py's own evaluation: "
                  f"{last['psnr']:.2f}); last step: " + ", ".join(f"{k} {last[k]:.4g}" for k in train_keys),
                  flush=True)

        # originals above each variant's reconstructions, for the eye
        from core.images import save_image_grid

        shown = min(16, len(images))
        save_image_grid(torch.cat([images[:shown], *(r["recon"][:shown] for r in rows.values())]),
                        work / "reconstructions.png", nrow=shown)

        lpips = perceptual is not None
        headers = ["variant", "steps", "PSNR (dB)", "SSIM", "sharpness", "codebook usage", "perplexity",
                   *(["LPIPS"] if lpips else []), "wall ms/step", "CPU ms/step"]
        table = [[name, r["steps"], f"{r['psnr']:.2f}", f"{r['ssim']:.3f}", f"{r['sharpness']:.3f}",
                  f"{r['codebook_usage']:.1%}", f"{r['perplexity']:.1f}",
                  *([f"{r['lpips']:.3f}"] if lpips else []), fmt(r["wall_ms"]), fmt(r["cpu_ms"])]
                 for name, r in rows.items()]
        print()
        print(machine_line(torch.device("cpu")))
        print(f"Tokenizer `tiny` at {args.image_size} px, f={args.downsample}, batch {batch}, {steps} steps, seed "
              f"{SEED}; GAN: PatchGAN {args.disc_channels} ch x {args.disc_layers} layers, hinge, weight "
              f"{args.disc_weight} x adaptive, from step {round(args.disc_start_frac * steps)}; "
              f"{len(images)} held-out images of {data}\n")
        print(markdown_table(headers, table))
        print("\nsharpness: high-frequency energy (image minus its 3x3 box blur) of reconstructions / originals; "
              "1.0 = as sharp as the originals\n")
        print("\n".join(verdicts(rows, len(images))))
        print(f"\nreconstructions: {work / 'reconstructions.png'} (originals, then one row per variant)"
              if tmp is None else "")
        print(f"total wall time {time.perf_counter() - total_start:.0f} s")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
