"""Does the tiny setup learn? Stage-1 reconstructions and stage-2 class-conditional samples, checked in one run.

    python bench/learning.py                         # real handwritten digits (scikit-learn's, at 32 px)
    python bench/learning.py --data shapes
    python bench/learning.py --data path/to/labelled/folder --work /tmp/learning
    python bench/learning.py --quick                 # seconds-to-minutes smoke test of every step; no targets
    python bench/learning.py --vq-args "--steps 400" --mg-args "--steps 800 --lr 2e-3"   # try preset overrides

(A) `train_vq.py --preset tiny`: held-out PSNR >= 25 dB and codebook usage >= 50% at the run's last evaluation,
within 3 CPU-minutes.
(B) `train_maskgit.py --preset tiny` (class-conditional) on that tokenizer, then `sample.py` at 8 steps, balanced
over the classes, with the sampling defaults the run measured at the end of its training ("default") and at
the --cfg scales given: >= 95% of the samples recognised as the class they were asked for by the judge of
bench/judge.py (a CNN trained on the real training images only, at their own resolution, without mirror images)
at the defaults, >= 98% at the best setting, no class below 85% at the defaults, the judge's Frechet distance at
the defaults within 3x the real-vs-real floor, and both stages, encoding and sampling 500 images together within 10
CPU-minutes. The judge draws 200 samples a class at every setting (--per-class), so that a class near the 85% bar is
decided to about +-2.5 points (50 a class move it by +-5 from one draw to the next). The budget counts sampling as
500 images: the draw's sampling CPU scaled to BUDGET_SAMPLES, so a larger draw does not eat the training budget.

On the digits stage 2 gets `--token-views none` (DATA_ARGS): a mirrored digit is not a digit, and the mirrored
copies of the default token cache cost about 30 points of class accuracy (docs/recipes.md).

CPU time is the user+sys time of each child process (wait4's rusage), the fair figure on a shared machine; wall time
is printed too. The children run with --threads intra-op threads (default 1): on a busy machine extra threads
spin while they wait for each other, which costs CPU time without saving wall time.

The judge (docs/judges.md) also reports the worst class, a Frechet distance in its features with the real-vs-real
floor beside it, precision and recall (k-NN manifolds) with their floors, and the class accuracy of a differently
built cross-check (an RBF SVM on 8x8 pixels). Stage 1 trains on horizontally mirrored copies as well as the
originals (a tokenizer only has to reconstruct them), the judge does not: a sample that comes out mirrored counts
as wrong.

Everything lands in --work (default: a new temporary folder): digits/, logs/, vq/, maskgit/, samples_cfg*/.
The run folders vq/, maskgit/ and samples_cfg*/ there are replaced on every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import REPO, cpu_model, fmt, markdown_table, usable_cores, verdict
from judge import Judge, binomial_std, load_real
from maskgit.sampler import SamplerConfig
from maskgit.tune import setting_text

TARGET_PSNR, TARGET_USAGE, TARGET_VQ_CPU_S = 25.0, 0.5, 180.0
# (B) targets: recognised at the run's measured sampling defaults and at the best setting tried; any other
# setting is held to the default's bar; every class at the defaults, and FD at the defaults within 3x the
# real-vs-real floor
TARGET_DEFAULT_ACCURACY, TARGET_BEST_ACCURACY, TARGET_FD_RATIO = 0.95, 0.98, 3.0
TARGET_WORST_CLASS = 0.85  # every class recognised this often at the defaults
TARGET_ACCURACY, TARGET_TOTAL_CPU_S = TARGET_DEFAULT_ACCURACY, 600.0
BUDGET_SAMPLES = 500  # the samples the CPU budget counts: a draw's sampling CPU is scaled to this many
SAMPLE_STEPS = 8
QUICK_VQ = ["--steps", "20", "--eval-every", "10", "--save-every", "20", "--warmup-steps", "5"]
QUICK_MG = ["--steps", "20", "--eval-every", "10", "--sample-every", "20", "--save-every", "20",
            "--warmup-steps", "5", "--tune-samples", "10", "--tune-temperatures", "1"]
DATA_ARGS = {"digits": ["--token-views", "none"]}  # stage-2 arguments a dataset needs (see the docstring)
QUICK_JUDGE_STEPS = 30  # --quick: a judge that runs, not one that judges well


def sampling_setting(text: str) -> str:
    """'default' or a guidance scale, kept as the label it is printed with."""
    return text if text == "default" else f"{float(text):g}"


def sampling_flags(setting: str) -> list[str]:
    return [] if setting == "default" else ["--cfg", setting]


def used_settings(mg_run: dict, setting: str) -> str:
    """What sample.py used for a setting: the measured defaults are read back from the run's config.json."""
    if setting != "default":
        return f"cfg {setting}"
    return "default: " + setting_text({**dataclasses.asdict(SamplerConfig()), **(mg_run.get("sampling") or {})})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="'digits' (made by bench/make_digits.py), 'shapes', or a "
                                                   "folder of images in class subfolders")
    p.add_argument("--work", type=Path, help="working folder (default: a new temporary folder)")
    p.add_argument("--quick", action="store_true", help="tiny step counts: a smoke test of every step, no targets")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP/MKL threads of the training and sampling processes (0: leave them unset)")
    p.add_argument("--per-class", type=int, default=200,
                   help="samples per class at every setting (200: a class near 85%% decided to about +-2.5 points)")
    p.add_argument("--cfg", nargs="+", default=["default", "0", "3"], type=sampling_setting,
                   help="guidance scales to sample with; 'default': the run's measured sampling defaults "
                        "(sample.py without --cfg/--temperature)")
    p.add_argument("--judge-steps", type=int, default=None,
                   help="updates of the judge's CNN (batches of 128; default: judge.DEFAULT_STEPS)")
    p.add_argument("--seed", type=int, default=0, help="seed of the judge")
    p.add_argument("--vq-args", default="", help="extra train_vq.py arguments (preset overrides), one string")
    p.add_argument("--mg-args", default="", help="extra train_maskgit.py arguments (preset overrides), one string")
    p.add_argument("--sample-args", default="", help="extra sample.py arguments, one string")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- child processes

class Child:
    """Runs the user-facing scripts as subprocesses and measures each one's wall and CPU time."""

    def __init__(self, logs: Path, threads: int):
        self.logs = logs
        self.env = dict(os.environ)
        if threads > 0:
            self.env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))

    def run(self, name: str, args: list[str]) -> tuple[float, float]:
        """(wall s, CPU s) of `python args...` run from the repository root; exits with its log tail on failure."""
        log = self.logs / f"{name}.log"
        start = time.perf_counter()
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=self.env, stdout=fh,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            # this child's own rusage (with its children), so runs in parallel threads are timed apart
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = rc = os.waitstatus_to_exitcode(status)
        wall, cpu = time.perf_counter() - start, usage.ru_utime + usage.ru_stime
        if rc:
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
            raise SystemExit(f"error: {' '.join(args[:1])} failed (exit {rc}); end of {log}:\n{tail}")
        print(f"  {name}: {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
        return wall, cpu


def budget_cpu(vq_cpu: float, mg_cpu: float, row: dict) -> float:
    """Both stages' CPU seconds and the row's sampling CPU scaled to BUDGET_SAMPLES samples."""
    return vq_cpu + mg_cpu + row["cpu"] * BUDGET_SAMPLES / row["n"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def prepare_data(data: str, work: Path, child: Child) -> str:
    """The --data value the training scripts get: the digits folder is written first when asked for."""
    if data != "digits":
        return data
    folder = work / "digits"
    if not (folder.is_dir() and len(list(folder.glob("*/*.png"))) == 1797):
        child.run("make_digits", ["bench/make_digits.py", "--out", str(folder), "--size", "32"])
    return str(folder)


# ----------------------------------------------------------------------------- the run

def main(argv=None) -> None:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="learning-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    for old in ["vq", "maskgit", *(p.name for p in work.glob("samples_cfg*"))]:
        shutil.rmtree(work / old, ignore_errors=True)
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # the classifier, in this process
    child = Child(work / "logs", args.threads)
    print(f"work folder: {work}", flush=True)
    data = prepare_data(args.data, work, child)
    vq_dir, mg_dir = work / "vq", work / "maskgit"

    print("stage 1: train_vq.py --preset tiny", flush=True)
    vq_extra = (QUICK_VQ if args.quick else []) + shlex.split(args.vq_args)
    vq_wall, vq_cpu = child.run("train_vq", ["train_vq.py", "--data", data, "--preset", "tiny", "--out", str(vq_dir),
                                             "--cpu", *vq_extra])
    vq_metrics = read_metrics(vq_dir)

    print("stage 2: train_maskgit.py --preset tiny (class-conditional)", flush=True)
    mg_extra = (QUICK_MG if args.quick else []) + DATA_ARGS.get(args.data, []) + shlex.split(args.mg_args)
    mg_wall, mg_cpu = child.run("train_maskgit", ["train_maskgit.py", "--vq", str(vq_dir), "--preset", "tiny",
                                                  "--class-cond", "true", "--out", str(mg_dir), "--cpu", *mg_extra])
    mg_last = read_metrics(mg_dir)[-1]
    mg_run = json.loads((mg_dir / "config.json").read_text())
    num_classes, image_size = mg_run["num_classes"], mg_run["data"]["image_size"]

    per_class = 5 if args.quick else args.per_class
    print(f"sampling: sample.py --steps {SAMPLE_STEPS}, {per_class} per class", flush=True)
    sampled = []
    for w in args.cfg:
        out = work / f"samples_cfg{w}"
        wall, cpu = child.run(f"sample_cfg{w}", [
            "sample.py", "--checkpoint", str(mg_dir), "--out", str(out), "--num", str(per_class * num_classes),
            "--batch-size", "100", "--steps", str(SAMPLE_STEPS), *sampling_flags(w), "--class", "all", "--cpu",
            *shlex.split(args.sample_args)])
        with np.load(out / "samples.npz") as npz:
            sampled.append((w, wall, cpu, npz["arr_0"], npz["labels"]))

    print("judge: a CNN and an SVM on the real images", flush=True)
    try:
        train_x, train_y = load_real(data, image_size, "train", mg_run["data"].get("data_root"))
        test_x, test_y = load_real(data, image_size, "test", mg_run["data"].get("data_root"))
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    judge = Judge.fit(train_x, train_y, test_x, test_y, seed=args.seed,
                      steps=args.judge_steps or (QUICK_JUDGE_STEPS if args.quick else None))
    rows = [{"cfg": used_settings(mg_run, w), "setting": w, "wall": wall, "cpu": cpu, **judge.score(pixels, labels)}
            for w, wall, cpu, pixels, labels in sampled]
    classes = mg_run.get("classes") or [str(c) for c in range(num_classes)]
    for r in rows:
        r["worst_name"] = classes[r["worst_class_index"]]

    report(args, work, data, vq_metrics, vq_wall, vq_cpu, mg_last, mg_wall, mg_cpu, judge, rows)


def report(args, work, data, vq_metrics, vq_wall, vq_cpu, mg_last, mg_wall, mg_cpu, judge, rows) -> None:
    vq_last = vq_metrics[-1]
    threads = args.threads if args.threads > 0 else "default"
    print(f"\n## Learning check: --data {args.data}{' (quick: no targets)' if args.quick else ''}\n")
    print(f"Machine: CPU {cpu_model()} ({usable_cores()} cores usable), torch {torch.__version__}, child threads "
          f"{threads}. Data: {data}. Overrides: vq [{args.vq_args}] maskgit "
          f"[{' '.join(DATA_ARGS.get(args.data, []) + [args.mg_args]).strip()}] "
          f"sample [{args.sample_args}]. Work folder: {work}\n")
    print("### (A) Stage 1: train_vq.py --preset tiny\n")
    print(markdown_table(
        ["step", "held-out PSNR (dB)", "codebook usage", "perplexity", "train images/s", "wall at eval (s)"],
        [[m["step"], fmt(m["psnr"]), f"{m['codebook_usage']:.1%}", fmt(m["perplexity"]),
          fmt(m.get("images_per_s", float("nan"))), fmt(m.get("wall_time_s", float("nan")))] for m in vq_metrics]))
    print(f"\nstage 1 total: {vq_wall:.0f} s wall, {vq_cpu:.0f} s CPU ({vq_cpu / 60:.2f} CPU-min)\n")
    print("### (B) Stage 2: train_maskgit.py --preset tiny, class-conditional; sample.py at "
          f"{SAMPLE_STEPS} steps\n")
    print(f"stage 2 (encoding + training): {mg_wall:.0f} s wall, {mg_cpu:.0f} s CPU; held-out masked accuracy "
          f"{mg_last.get('eval_masked_acc', float('nan')):.3f}, masked loss "
          f"{mg_last.get('eval_loss', float('nan')):.3f} at step {mg_last['step']}\n")
    n = rows[0]["n"] if rows else 0
    floor = judge.floor(n)
    print(f"judge (bench/judge.py): {judge.describe()}\n")
    print(markdown_table(
        ["sampling", "samples", f"recognised (ceiling {judge.ceiling:.1%})", "worst class",
         f"cross-check (ceiling {judge.cross_check_ceiling:.1%})", f"FD (floor {fmt(floor['fd'])})",
         f"precision (floor {floor['precision']:.2f})", f"recall (floor {floor['recall']:.2f})",
         "sampling CPU (s)", "sampling wall (s)", f"total CPU, both stages + sampling {BUDGET_SAMPLES} (s)"],
        [[r["cfg"], r["n"], f"{r['accuracy']:.1%} ± {binomial_std(r['accuracy'], r['n']):.1%}",
          f"{r['worst_class']:.0%} ({r['worst_name']})", f"{r['cross_check_accuracy']:.1%}",
          fmt(r["fd"]), f"{r['precision']:.2f}", f"{r['recall']:.2f}", fmt(r["cpu"]), fmt(r["wall"]),
          fmt(budget_cpu(vq_cpu, mg_cpu, r))] for r in rows]))
    print(f"\nRecognised: share of samples the judge's CNN assigns to the class they were asked for (± binomial "
          f"std); its ceiling is its accuracy on the real held-out images. FD: Frechet distance of its features of "
          f"the samples to those of the {judge.info['held_out']} real held-out images; precision / recall: k-NN "
          f"manifolds (k=3) in the same features. Floors: {min(n, judge.info['train'])} real training images "
          f"scored the same way.")
    if args.quick:
        print("\n(quick run: step counts too small for the targets; none checked)")
        return
    print("\n### Targets\n")
    print(verdict(f"stage 1 held-out PSNR >= {TARGET_PSNR:g} dB", vq_last["psnr"] >= TARGET_PSNR,
                  f"{vq_last['psnr']:.2f} dB at step {vq_last['step']}"))
    print(verdict(f"stage 1 codebook usage >= {TARGET_USAGE:.0%}", vq_last["codebook_usage"] >= TARGET_USAGE,
                  f"{vq_last['codebook_usage']:.1%}"))
    print(verdict(f"stage 1 within {TARGET_VQ_CPU_S / 60:g} CPU-minutes", vq_cpu <= TARGET_VQ_CPU_S,
                  f"{vq_cpu:.0f} s CPU ({vq_wall:.0f} s wall)"))
    for r in rows:
        total = budget_cpu(vq_cpu, mg_cpu, r)
        target = TARGET_DEFAULT_ACCURACY if r["setting"] == "default" else TARGET_ACCURACY
        print(verdict(f"{r['cfg']}: >= {target:.0%} of samples recognised as their class",
                      r["accuracy"] >= target,
                      f"{r['accuracy']:.1%} (cross-check {r['cross_check_accuracy']:.1%}; worst class "
                      f"{r['worst_class']:.0%}; FD {fmt(r['fd'])}, floor {fmt(r['fd_floor'])})"))
        print(verdict(f"{r['cfg']}: both stages + sampling {BUDGET_SAMPLES} within {TARGET_TOTAL_CPU_S / 60:g} "
                      "CPU-minutes",
                      total <= TARGET_TOTAL_CPU_S, f"{total:.0f} s CPU"))
    best = max(rows, key=lambda r: r["accuracy"])
    print(verdict(f"best setting: >= {TARGET_BEST_ACCURACY:.0%} recognised", best["accuracy"] >= TARGET_BEST_ACCURACY,
                  f"{best['accuracy']:.1%} ({best['cfg']})"))
    for r in rows:
        if r["setting"] == "default":
            print(verdict(f"sampling defaults: FD within {TARGET_FD_RATIO:g}x the real-vs-real floor",
                          r["fd"] <= TARGET_FD_RATIO * r["fd_floor"],
                          f"FD {fmt(r['fd'])} = {r['fd'] / r['fd_floor']:.1f}x the floor {fmt(r['fd_floor'])}"))
            per_class = r["n"] // judge.num_classes
            print(verdict(f"sampling defaults: no class below {TARGET_WORST_CLASS:.0%} recognised",
                          r["worst_class"] >= TARGET_WORST_CLASS,
                          f"worst class {r['worst_name']} at {r['worst_class']:.0%} of {per_class} samples "
                          f"(± {binomial_std(TARGET_WORST_CLASS, per_class):.0%} at the bar)"))


if __name__ == "__main__":
    main()
