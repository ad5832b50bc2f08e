"""Sample quality against decoding settings, judged by a classifier trained on real images.

    python bench/quality.py --train                              # train both tiny stages on shapes first (~13 CPU min)
    python bench/quality.py --vq runs/vq --maskgit runs/maskgit  # score runs trained with --critic self
    python bench/quality.py --quick                              # seconds: untrained models, a smoke test

The judge (bench/judge.py, docs/judges.md) is independent of the generator: a small CNN trained on the real
training images of the run's dataset (labelled; `shapes` by default) at their own resolution, without mirror images.
For the class-conditional samples of every setting it reports the class accuracy (the CNN agrees with the requested
label; its accuracy on real held-out images is the ceiling), the worst class, the class accuracy of a differently
built cross-check (an RBF SVM on 8x8 pixels), a Frechet distance (FD) between the CNN's penultimate features of
the samples and of the real held-out images, and precision and recall with k-NN manifolds in those features.
Column headers carry the ceiling and the real-vs-real floors (as many real training images as samples). The
reference row of the tokenizer's reconstructions (of as many real training images) shows what a faithful
generator on this tokenizer can reach. The spread after FD is a bootstrap over the samples.

Settings vary one thing at a time around confidence / cosine / no guidance: steps x schedule (the MaskGIT paper's
cosine-vs-linear claim), steps x sampler, guidance x sampler, guidance x choice temperature and guidance x
re-masking at 8 steps (`--full` crosses everything). The halton sampler never re-masks (its order is fixed).
Every setting draws from the same seed, so differences come from the settings rather than from the draws.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import REPO, autocast, fmt, machine_line, markdown_table, pick_device
from judge import Judge, load_real, reconstruction_score

BASE = dict(strategy="confidence", schedule="cosine", cfg=0.0)
FEW_STEPS = 8  # "few steps" for the cosine-vs-linear verdict: every swept step count up to this
QUICK_JUDGE_STEPS = 30  # --quick: a judge that runs, not one that judges well


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vq", help="stage-1 run folder (train_vq.py); default: the one recorded by --maskgit")
    p.add_argument("--maskgit", help="stage-2 run folder (train_maskgit.py, ideally with --critic self)")
    p.add_argument("--train", action="store_true", help="train both tiny stages into --workdir first (reused if there)")
    p.add_argument("--workdir", default="runs/bench_quality", help="where --train puts its runs")
    p.add_argument("--untrained", action="store_true", help="random-initialised tiny models (for smoke tests)")
    p.add_argument("--num", type=int, default=500, help="samples per setting")
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8, 12, 16], help="decoding steps to sweep")
    p.add_argument("--samplers", nargs="+", default=["confidence", "critic", "halton"],
                   help="sampler strategies (critic needs a model with a token critic)")
    p.add_argument("--schedules", nargs="+", default=["cosine", "linear"], help="mask schedules")
    p.add_argument("--cfg", type=float, nargs="+", default=[0.0, 1.0, 3.0], help="guidance scales")
    p.add_argument("--temperature", type=float, default=None,
                   help="token temperature of every setting (default: the run's measured sampling default, else 1)")
    p.add_argument("--choice-temperatures", type=float, nargs="+", default=None,
                   help="choice temperatures (Gumbel noise on the confidences) to sweep; the first is the base "
                        "setting's (default: the run's measured sampling default, else the sampler's)")
    p.add_argument("--remask", nargs="+", choices=["off", "on"], default=None,
                   help="re-masking to sweep; the first is the base setting's (default: the run's measured sampling "
                        "default, else off; halton never re-masks, so compare orders with --remask off)")
    p.add_argument("--full", action="store_true", help="every combination instead of one factor at a time")
    p.add_argument("--batch", type=int, default=250, help="samples per generate() call")
    p.add_argument("--judge-steps", type=int, default=None,
                   help="updates of the judge's CNN (batches of 128; default: judge.DEFAULT_STEPS)")
    p.add_argument("--bootstrap", type=int, default=50, help="bootstrap resamples for the FD spread (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the classifier and of every setting's draws")
    p.add_argument("--raw", action="store_true", help="use the raw weights rather than the EMA")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="few samples, small classifier data: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.num, args.batch, args.steps, args.bootstrap = 20, 20, [4, 8], 10
        args.judge_steps = args.judge_steps or QUICK_JUDGE_STEPS
        args.untrained = args.untrained or not (args.maskgit or args.train)
    if not (args.maskgit or args.train or args.untrained):
        p.error("give --maskgit RUN_DIR (and optionally --vq), --train, or --untrained")
    return args


# ----------------------------------------------------------------------------- the models under test

def train_tiny(workdir: Path, quick: bool, threads: int) -> Path:
    """Train the tiny presets on shapes (train_vq.py, then train_maskgit.py --critic self); return the stage-2 run."""
    vq_run, mg_run = workdir / "vq", workdir / "maskgit"
    short = ["--steps", "20", "--eval-every", "20", "--save-every", "20", "--num-eval-images", "64"] if quick else []
    jobs = [
        (vq_run, ["train_vq.py", "--data", "shapes", "--preset", "tiny", "--out", vq_run, *short]),
        (mg_run, ["train_maskgit.py", "--vq", vq_run, "--preset", "tiny", "--critic", "self", "--out", mg_run, *short,
                  *(["--sample-every", "20", "--num-sample-images", "10"] if quick else [])]),
    ]
    for run, cmd in jobs:
        if (run / "config.json").is_file() and any(run.glob("*.safetensors")):
            print(f"reusing the trained run in {run}", file=sys.stderr)
            continue
        print(f"training: python {' '.join(map(str, cmd))}", file=sys.stderr, flush=True)
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO, env=env, check=True)
    return mg_run


def untrained_models(device, quick: bool):
    """Random-initialised tiny tokenizer (codebook seeded by k-means on real images) and MaskGIT with a self critic
    (the tiny preset's, or a one-block one for `quick`)."""
    import dataclasses

    from maskgit.config import MASKGIT_PRESETS
    from maskgit.model import build_maskgit
    from vqvae.config import VQ_PRESETS
    from core.data import SHAPES_CLASSES, make_shapes
    from vqvae.model import VQVAE

    torch.manual_seed(0)
    vq_cfg = VQ_PRESETS["tiny"][0]
    vq = VQVAE(vq_cfg, sync_codebook=False).to(device).eval()
    images, _ = make_shapes(64, vq_cfg.image_size)
    vq(images.float().div(127.5).sub(1).to(device))  # the first forward seeds the codebook
    cfg = dataclasses.replace(MASKGIT_PRESETS["tiny"][0], critic="self")
    if quick:
        cfg = dataclasses.replace(cfg, dim=32, depth=1, heads=2)
    model = build_maskgit(cfg, codebook_size=vq.codebook_size, grid=vq.grid_size, num_classes=len(SHAPES_CLASSES))
    data = {"data": "shapes", "data_root": None, "image_size": vq_cfg.image_size}
    return model.to(device).eval(), vq, data, list(SHAPES_CLASSES)


def trained_models(args, device):
    from maskgit import load_maskgit
    from vqvae import load_tokenizer

    model, vq, run = load_maskgit(args.maskgit, device=device, ema=not args.raw)
    if args.vq:
        vq = load_tokenizer(args.vq, device=device)
        if (vq.codebook_size, tuple(vq.grid_size)) != (model.codebook_size, model.grid):
            raise SystemExit(f"error: --vq {args.vq} does not match the codes {args.maskgit} was trained on")
    if model.num_classes == 0:
        raise SystemExit("error: the MaskGIT run is unconditional: class accuracy needs a class-conditional model")
    return model, vq, {**run.data, "sampling": run.config.get("sampling")}, list(run.classes)


# ----------------------------------------------------------------------------- the sweep

def settings(args, has_critic: bool) -> list[dict]:
    samplers = [s for s in args.samplers if s != "critic" or has_critic]
    if len(samplers) < len(args.samplers):
        print("the model has no token critic: skipping the critic sampler", file=sys.stderr)
    choices, remasks = args.choice_temperatures, [r == "on" for r in args.remask]
    if args.full:
        grid = [dict(strategy=st, schedule=sc, cfg=w, steps=n, choice_temperature=c, remask=r)
                for st, sc, w, n, c, r in itertools.product(samplers, args.schedules, args.cfg, args.steps, choices,
                                                            remasks)]
    else:
        mid = FEW_STEPS if FEW_STEPS in args.steps else args.steps[len(args.steps) // 2]
        base = {**BASE, "strategy": samplers[0] if BASE["strategy"] not in samplers else BASE["strategy"],
                "choice_temperature": choices[0], "remask": remasks[0]}
        grid = [{**base, "schedule": sc, "steps": n} for sc in args.schedules for n in args.steps]
        grid += [{**base, "strategy": st, "steps": n} for st in samplers for n in args.steps]
        grid += [{**base, "strategy": st, "cfg": w, "steps": mid} for st in samplers for w in args.cfg]
        grid += [{**base, "cfg": w, "choice_temperature": c, "steps": mid} for w in args.cfg for c in choices]
        grid += [{**base, "cfg": w, "remask": r, "steps": mid} for w in args.cfg for r in remasks]
    unique = []
    for s in grid:
        s = {**s, "cfg": float(s["cfg"]), "choice_temperature": float(s["choice_temperature"]),
             "remask": s["remask"] and s["strategy"] != "halton"}  # a fixed order takes nothing back
        if s not in unique:
            unique.append(s)
    return unique


@torch.inference_mode()
def generate(model, vq, setting: dict, num: int, num_classes: int, batch: int, seed: int, device):
    """num decoded images (num, 3, S, S) in [-1, 1] with labels 0, 1, ..., C-1, 0, ... and those labels."""
    labels = torch.arange(num) % num_classes
    gen = torch.Generator(device=device).manual_seed(seed)
    images = []
    for chunk in labels.split(batch):
        with autocast(device):
            codes = model.generate(labels=chunk.to(device), steps=setting["steps"], strategy=setting["strategy"],
                                   schedule=setting["schedule"], cfg=setting["cfg"], generator=gen,
                                   temperature=setting["temperature"], temperature_end=setting["temperature"],
                                   choice_temperature=setting["choice_temperature"], remask=setting["remask"])
            images.append(vq.decode(codes.view(len(chunk), *model.grid)).float().clamp(-1, 1).cpu())
    return torch.cat(images), labels.numpy()


def cosine_verdict(rows: list[dict], steps: list[int], choice_temperature: float, remask: bool) -> str:
    """Does cosine beat linear at few steps (Chang et al. 2022, Fig. 8)? Judged on FD, differences beyond 2 sigma,
    at the base setting's sampler, guidance, choice temperature and re-masking."""
    few = [n for n in steps if n <= FEW_STEPS] or steps[:1]
    lines, wins, losses = [], 0, 0
    for n in few:
        pick = {r["schedule"]: r for r in rows if r["steps"] == n and r["strategy"] == BASE["strategy"]
                and r["cfg"] == BASE["cfg"] and r["choice_temperature"] == choice_temperature
                and r["remask"] == remask}
        if not {"cosine", "linear"} <= set(pick):
            continue
        c, lin = pick["cosine"], pick["linear"]
        sigma = math.hypot(c["fd_std"], lin["fd_std"]) if math.isfinite(c["fd_std"] + lin["fd_std"]) else 0.0
        diff = lin["fd"] - c["fd"]
        outcome = "cosine better" if diff > 2 * sigma else "linear better" if diff < -2 * sigma else "tie"
        wins, losses = wins + (outcome == "cosine better"), losses + (outcome == "linear better")
        lines.append(f"{n} steps: FD cosine {fmt(c['fd'])} vs linear {fmt(lin['fd'])} ({outcome}; "
                     f"accuracy {c['acc']:.1%} vs {lin['acc']:.1%})")
    if not lines:
        return "- Cosine vs linear: not measured (needs both schedules in --schedules)."
    word = ("CONFIRMED" if wins and not losses else "CONTRADICTED" if losses and not wins
            else "MIXED" if wins else "INCONCLUSIVE (within noise)")
    return f"- Cosine beats linear at few steps (MaskGIT paper): {word}. " + "; ".join(lines) + "."


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train:
        args.maskgit = str(train_tiny(Path(args.workdir), args.quick, args.threads))
    model, vq, data, classes = untrained_models(device, args.quick) if args.untrained else trained_models(args, device)
    num_classes = len(classes)
    from maskgit.sampler import SamplerConfig

    measured = data.get("sampling") or {}
    if args.temperature is None:
        args.temperature = float(measured.get("temperature", 1.0))
    if args.choice_temperatures is None:
        args.choice_temperatures = [float(measured.get("choice_temperature", SamplerConfig.choice_temperature))]
    if args.remask is None:
        args.remask = ["on" if measured.get("remask", SamplerConfig.remask) else "off"]

    small = 400 if args.quick else None
    t0 = time.perf_counter()
    try:
        train_x, train_y = load_real(data["data"], data["image_size"], "train", data.get("data_root"), small, args.seed)
        test_x, test_y = load_real(data["data"], data["image_size"], "test", data.get("data_root"),
                                   100 if args.quick else None, args.seed)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    print(f"training the judge on {len(train_x)} real images", file=sys.stderr, flush=True)
    judge = Judge.fit(train_x, train_y, test_x, test_y, seed=args.seed, steps=args.judge_steps, device=device)
    judge_seconds = time.perf_counter() - t0

    # what a faithful generator on this tokenizer can reach: its reconstructions of as many real training images
    recon_score = reconstruction_score(judge, vq, train_x, train_y, args.num, seed=args.seed, batch=args.batch,
                                       device=device, context=lambda: autocast(device), bootstrap=args.bootstrap)

    rows = []
    for setting in settings(args, model.has_critic):
        setting["temperature"] = args.temperature
        print(f"sampling {setting}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        images, labels = generate(model, vq, setting, args.num, num_classes, args.batch, args.seed, device)
        seconds = time.perf_counter() - start
        score = judge.score(images, labels, bootstrap=args.bootstrap)
        rows.append({**setting, **score, "acc": score["accuracy"], "fd_std": score.get("fd_std", float("nan")),
                     "seconds": seconds})

    floor = judge.floor(args.num)
    source = "untrained tiny models" if args.untrained else f"{args.maskgit}" + (" (raw weights)" if args.raw else "")
    headers = ["sampler", "schedule", "steps", "guidance", "choice temperature", "re-masking",
               f"class accuracy (ceiling {judge.ceiling:.1%})", "worst class",
               f"cross-check accuracy (ceiling {judge.cross_check_ceiling:.1%})",
               f"FD (floor {fmt(floor['fd'])})", f"precision (floor {floor['precision']:.2f})",
               f"recall (floor {floor['recall']:.2f})", "sampling s"]

    def cells(r: dict) -> list:
        return [f"{r['accuracy']:.1%} ± {_binom(r['accuracy'], r['n'])}",
                f"{r['worst_class']:.0%} ({classes[r['worst_class_index']]})", f"{r['cross_check_accuracy']:.1%}",
                f"{fmt(r['fd'])} ± {fmt(r.get('fd_std', float('nan')), 2)}", f"{r['precision']:.2f}",
                f"{r['recall']:.2f}"]

    table = [[r["strategy"], r["schedule"], r["steps"], fmt(r["cfg"], 2), fmt(r["choice_temperature"], 2),
              "on" if r["remask"] else "off", *cells(r), fmt(r["seconds"])] for r in rows]
    table.append([f"*tokenizer reconstructions of {recon_score['n']} real training images*", "-", "-", "-", "-", "-",
                  *cells(recon_score), "-"])
    print("\n".join([
        f"## Sample quality on `{data['data']}` ({source}), {args.num} class-conditional samples per setting, "
        f"token temperature {args.temperature:g}", "",
        machine_line(device), "",
        f"Judge (bench/judge.py, {judge_seconds:.0f} s to build with data): {judge.describe()}.", "",
        "Class accuracy: share of samples the CNN assigns to the class they were asked for (± binomial std); the "
        "ceiling is its accuracy on real held-out images. FD: Frechet distance of the CNN's "
        f"{judge.held_out_features.shape[1]}-d penultimate features of the samples to those of the {len(test_x)} "
        "real held-out images (lower is better; ± bootstrap std). Precision / recall: k-NN manifolds (k=3) in the "
        "same features (Kynkaenniemi et al. 2019): share of samples among real images / of real images covered by "
        f"the samples. Floors: {min(args.num, len(train_x))} real training images scored the same way.", "",
        markdown_table(headers, table), "",
        cosine_verdict(rows, args.steps, args.choice_temperatures[0], args.remask[0] == "on"), "",
    ]))


def _binom(p: float, n: int) -> str:
    return f"{math.sqrt(max(p * (1 - p), 0.0) / n):.1%}"


if __name__ == "__main__":
    main()
