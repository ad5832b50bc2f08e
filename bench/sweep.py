"""Recipe sweeps for the tiny presets: which settings give the best class-conditional samples per CPU-minute?

    python bench/sweep.py --list                                  # the built-in variants
    python bench/sweep.py --data digits --work /tmp/sweep --jobs 2
    python bench/sweep.py --data shapes --work /tmp/sweep-shapes --only base views-none
    python bench/sweep.py --variant "wide: --vq-args '' --mg-args '--dim 192 --depth 6'"   # ad hoc (repeatable)

Every variant runs the user-facing scripts (train_vq.py --preset tiny, train_maskgit.py --preset tiny, sample.py
at 8 steps, balanced over the classes) with its own overrides, and the strict judge of bench/judge.py scores the
samples against the real held-out images (docs/judges.md): class accuracy, worst class, Frechet distance with
its real-vs-real floor, precision and recall, and the differently built cross-check. CPU time is each child's own
user+sys time (wait4), so --jobs parallel variants are timed apart; the budget column is stage 1 + stage 2 + one
sampling run, against the 10 CPU-minutes the tiny recipes may use.

Stage-1 runs are shared by every variant with the same --vq-args. Finished variants are appended to
WORK/results.jsonl and skipped when the sweep is run again (delete the line, or the file, to redo one); finished
trainings and sampling runs are reused too (each child's folder gets a sweep_cpu.json when it ends), so an
interrupted sweep resumes. The table at the end covers every line of results.jsonl.

A second table judges each stage-1 run's reconstructions of as many real training images as a variant samples
(WORK/stage1.jsonl): a faithful generator on a tokenizer is recognised no more often than its reconstructions of
real images, and their FD shows what the tokenizer's blur alone costs in the judge's features.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from common import cpu_model, fmt, markdown_table, usable_cores
from judge import Judge, load_real, reconstruction_score
from learning import (SAMPLE_STEPS, Child, prepare_data, read_metrics, sampling_flags, sampling_setting,
                      used_settings)

BUDGET_CPU_S = 600.0

# (name, stage-1 overrides, stage-2 overrides): one change at a time from the preset, then combinations. The
# rows of docs/recipes.md measured before the stage-2 preset became width 64 x 5,000 steps ran on width 128 x 2,000
# steps at lr 1e-3 (the "dim128-2k" variant); the options they name are flags, so they still run as written.
VARIANTS = [
    ("preset", "", ""),
    ("views-none", "", "--token-views none"),
    ("dim128-2k", "", "--token-views none --dim 128 --steps 2000 --warmup-steps 100 --lr 1e-3"),
    ("dim96-3.5k", "", "--token-views none --dim 96 --steps 3500 --warmup-steps 175 --lr 1e-3"),
    ("dim48-7k", "", "--token-views none --dim 48 --steps 7000 --warmup-steps 300 --lr 3e-3"),
    ("lr3e-3", "", "--token-views none --lr 3e-3"),
    ("steps6k", "", "--token-views none --steps 6000 --warmup-steps 300"),
    ("steps4k", "", "--token-views none --steps 4000 --warmup-steps 200"),
    ("lr2e-3", "", "--token-views none --lr 2e-3"),
    ("swiglu", "", "--token-views none --ff-glu true --ff-mult 3"),
    ("qknorm", "", "--token-views none --qk-norm true"),
    ("class-token", "", "--token-views none --class-cond-mode token"),  # the preset conditions by adaptive LayerNorm
    ("rope2d", "", "--token-views none --positions rope2d"),
    ("ls0.1", "", "--token-views none --label-smoothing 0.1"),
    ("drop0.2", "", "--token-views none --cond-drop-prob 0.2"),
    ("mdlm", "", "--token-views none --mdlm-weight true"),
    ("vq-fsq64", "--fsq-levels 4 4 4 --codebook-size 64", "--token-views none"),  # the stage-1 preset had 64 codes
    ("vq-vq64", "--quantizer vq --codebook-size 64", "--token-views none"),
    ("wide192", "", "--token-views none --dim 192 --heads 4"),
    ("deep6", "", "--token-views none --depth 6"),
    ("vq-1200", "--steps 1200 --eval-every 400 --save-every 400", "--token-views none"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="'digits', 'shapes' or a labelled image folder")
    p.add_argument("--work", type=Path, required=False, help="working folder (results.jsonl, runs, logs)")
    p.add_argument("--jobs", type=int, default=2, help="variants trained at once (each with --threads threads)")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads per child process")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these built-in variants")
    p.add_argument("--variant", action="append", default=[], metavar="'NAME: --vq-args ... --mg-args ...'",
                   help="an ad-hoc variant (repeatable): a name, a colon, then --vq-args/--mg-args strings")
    p.add_argument("--cfg", nargs="+", type=sampling_setting, default=["default", "0", "2"],
                   help="guidance scales to sample with; 'default': the run's measured sampling defaults")
    p.add_argument("--per-class", type=int, default=50, help="samples per class")
    p.add_argument("--judge-steps", type=int, help="updates of the judge's CNN (default: judge.DEFAULT_STEPS)")
    p.add_argument("--list", action="store_true", help="print the built-in variants and exit")
    args = p.parse_args(argv)
    if not args.list and args.work is None:
        p.error("--work is required (results.jsonl there makes the sweep resumable)")
    return args


def parse_variant(text: str) -> tuple[str, str, str]:
    name, _, rest = text.partition(":")
    p = argparse.ArgumentParser(prog="--variant")
    p.add_argument("--vq-args", default="")
    p.add_argument("--mg-args", default="")
    parsed = p.parse_args(shlex.split(rest))
    return name.strip(), parsed.vq_args, parsed.mg_args


class Sweep:
    def __init__(self, args, data: str, child: Child):
        self.args, self.data, self.child, self.work = args, data, child, args.work
        self.vq_locks: dict[str, threading.Lock] = {}
        self.lock = threading.Lock()

    @staticmethod
    def stage1_dir(work: Path, vq_args: str) -> Path:
        """Where the stage-1 run with these overrides lives: named by a hash of them."""
        return work / "vq" / hashlib.sha1(vq_args.encode()).hexdigest()[:10]

    def stage1(self, vq_args: str) -> tuple[Path, float]:
        """The run folder and CPU seconds of train_vq.py --preset tiny with these overrides (trained once)."""
        out = self.stage1_dir(self.work, vq_args)
        with self.lock:
            lock = self.vq_locks.setdefault(out.name, threading.Lock())
        with lock:
            done = out / "sweep_cpu.json"
            if not done.exists():
                shutil.rmtree(out, ignore_errors=True)
                _, cpu = self.child.run(f"vq_{out.name}", ["train_vq.py", "--data", self.data, "--preset", "tiny",
                                                           "--out", str(out), "--cpu", *shlex.split(vq_args)])
                done.write_text(json.dumps({"cpu": cpu, "vq_args": vq_args}))
            return out, json.loads(done.read_text())["cpu"]

    def finished(self, folder: Path, what: str) -> float | None:
        """CPU seconds of a child that finished earlier (its sweep_cpu.json), else None: the folder is cleared."""
        done = folder / "sweep_cpu.json"
        if done.exists():
            record = json.loads(done.read_text())
            if record.get("what") == what:
                return record["cpu"]
        shutil.rmtree(folder, ignore_errors=True)
        return None

    def run(self, name: str, vq_args: str, mg_args: str) -> dict:
        """Train (or reuse) and sample one variant; the children's CPU seconds and the sample files."""
        vq_dir, vq_cpu = self.stage1(vq_args)
        mg_dir = self.work / "maskgit" / name
        what = json.dumps([vq_args, mg_args])
        mg_cpu = self.finished(mg_dir, what)
        if mg_cpu is None:
            _, mg_cpu = self.child.run(f"mg_{name}", ["train_maskgit.py", "--vq", str(vq_dir), "--preset", "tiny",
                                                      "--class-cond", "true", "--out", str(mg_dir), "--cpu",
                                                      *shlex.split(mg_args)])
            (mg_dir / "sweep_cpu.json").write_text(json.dumps({"cpu": mg_cpu, "what": what}))
        run = json.loads((mg_dir / "config.json").read_text())
        samples = []
        for w in self.args.cfg:
            out = self.work / "samples" / f"{name}_cfg{w}"
            sample_what = json.dumps([what, w, self.args.per_class])
            cpu = self.finished(out, sample_what)
            if cpu is None:
                _, cpu = self.child.run(f"sample_{name}_cfg{w}", [
                    "sample.py", "--checkpoint", str(mg_dir), "--out", str(out),
                    "--num", str(self.args.per_class * run["num_classes"]), "--batch-size", "100",
                    "--steps", str(SAMPLE_STEPS), *sampling_flags(w), "--class", "all", "--cpu"])
                (out / "sweep_cpu.json").write_text(json.dumps({"cpu": cpu, "what": sample_what}))
            samples.append((w, used_settings(run, w), cpu, str(out / "samples.npz")))
        last = read_metrics(mg_dir)[-1]
        psnr = read_metrics(vq_dir)[-1]["psnr"]
        return dict(name=name, vq_args=vq_args, mg_args=mg_args, vq_cpu=vq_cpu, mg_cpu=mg_cpu, vq_psnr=psnr,
                    eval_loss=last.get("eval_loss"), eval_acc=last.get("eval_masked_acc"),
                    image_size=run["data"]["image_size"], data_root=run["data"].get("data_root"),
                    samples=samples)


def reconstruction_row(judge: Judge, vq_dir: Path, row: dict, images: torch.Tensor, labels: np.ndarray) -> dict:
    """The judge on a stage-1 run's reconstructions of as many real training images as `row` (a result of a variant
    trained on it) has samples: the tokenizer's share of what the samples lose."""
    from vqvae import load_tokenizer

    s = reconstruction_score(judge, load_tokenizer(vq_dir, device="cpu"), images, labels, row["n"])
    return {"vq_dir": str(vq_dir), "vq_args": row["vq_args"], "vq_cpu": row["vq_cpu"], "vq_psnr": row["vq_psnr"],
            **{k: s[k] for k in ("n", "accuracy", "worst_class", "fd", "fd_floor", "precision", "recall")}}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def score(judge: Judge, result: dict) -> list[dict]:
    rows = []
    for w, used, cpu, path in result["samples"]:
        with np.load(path) as npz:
            s = judge.score(npz["arr_0"], npz["labels"])
        rows.append({**{k: v for k, v in result.items() if k != "samples"}, "cfg": w, "used": used, "sample_cpu": cpu,
                     "total_cpu": result["vq_cpu"] + result["mg_cpu"] + cpu,
                     **{k: s[k] for k in ("accuracy", "worst_class", "cross_check_accuracy", "fd", "precision",
                                          "recall", "n", "fd_floor", "precision_floor", "recall_floor",
                                          "ceiling")}})
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    variants = VARIANTS + [parse_variant(v) for v in args.variant]
    if args.list:
        print(markdown_table(["name", "train_vq.py overrides", "train_maskgit.py overrides"],
                             [[n, f"`{v}`" if v else "", f"`{m}`" if m else ""] for n, v, m in variants]))
        return
    if args.only:
        unknown = set(args.only) - {n for n, _, _ in variants}
        if unknown:
            raise SystemExit(f"error: unknown variant(s) {sorted(unknown)}; see --list")
        variants = [v for v in variants if v[0] in args.only or v in variants[len(VARIANTS):]]
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "logs").mkdir(exist_ok=True)
    child = Child(args.work / "logs", args.threads)
    data = prepare_data(args.data, args.work, child)
    results_path, stage1_path = args.work / "results.jsonl", args.work / "stage1.jsonl"
    done = {}
    for row in read_jsonl(results_path):
        row["cfg"] = sampling_setting(str(row["cfg"]))
        row.setdefault("used", f"cfg {row['cfg']}")
        done[(row["name"], row["cfg"])] = row
    stage1 = {row["vq_dir"]: row for row in read_jsonl(stage1_path)}
    todo = [v for v in variants if not all((v[0], w) in done for w in args.cfg)]
    print(f"work folder: {args.work}; {len(todo)} variant(s) to run, {len(variants) - len(todo)} done", flush=True)

    sweep = Sweep(args, data, child)

    def one(variant) -> dict | None:
        """Training and sampling (child processes) in a pool thread; a failure is reported, not raised."""
        try:
            return sweep.run(*variant)
        except SystemExit as err:  # a child failed: its log tail is in the message
            print(f"  {variant[0]}: FAILED ({str(err).splitlines()[0]})", flush=True)
        except Exception:  # noqa: BLE001 - one broken variant must not end the sweep
            print(f"  {variant[0]}: FAILED\n{traceback.format_exc()}", flush=True)
        return None

    judge = real = None
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for future in as_completed([pool.submit(one, v) for v in todo]):
            result = future.result()
            if result is None:
                continue
            if judge is None:  # fitted once, in this (main) thread, with the first run's resolution
                size, root = result["image_size"], result["data_root"]
                real = load_real(data, size, "train", root)
                judge = Judge.fit(*real, *load_real(data, size, "test", root), seed=0, steps=args.judge_steps)
            with open(results_path, "a") as fh:
                for r in score(judge, result):
                    fh.write(json.dumps(r) + "\n")
                    done[(r["name"], r["cfg"])] = r
                    print(f"  {r['name']} {r['used']}: {r['accuracy']:.1%} recognised, FD {fmt(r['fd'])}, "
                          f"{r['total_cpu']:.0f} CPU-s", flush=True)
    rows = list(done.values())
    # stage-1 runs not judged yet (WORK/stage1.jsonl keeps those that were), and rows written before the floors
    # were kept
    unjudged = {r["vq_args"]: r for r in rows if str(Sweep.stage1_dir(args.work, r["vq_args"])) not in stage1
                and (Sweep.stage1_dir(args.work, r["vq_args"]) / "model.safetensors").exists()}
    if unjudged or not all("fd_floor" in r for r in rows):
        first = json.loads((args.work / "maskgit" / rows[0]["name"] / "config.json").read_text())["data"]
        if judge is None:
            real = load_real(data, first["image_size"], "train", first.get("data_root"))
            judge = Judge.fit(*real, *load_real(data, first["image_size"], "test", first.get("data_root")),
                              seed=0, steps=args.judge_steps)
        for r in rows:
            floor = judge.floor(r["n"])
            r.update(fd_floor=floor["fd"], precision_floor=floor["precision"], recall_floor=floor["recall"],
                     ceiling=judge.ceiling)
        for vq_args, r in unjudged.items():
            row = reconstruction_row(judge, Sweep.stage1_dir(args.work, vq_args), r, *real)
            with open(stage1_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            stage1[row["vq_dir"]] = row
    report(args, rows, list(stage1.values()))


def report(args, rows: list[dict], stage1: list[dict]) -> None:
    print(f"\n## Sweep: --data {args.data}\n")
    print(f"Machine: CPU {cpu_model()} ({usable_cores()} cores usable), torch {torch.__version__}, {args.jobs} "
          f"variant(s) at once, {args.threads} thread(s) each. Samples: {args.per_class} per class, "
          f"{SAMPLE_STEPS} steps. Judge: bench/judge.py. Sorted by recognised share; budget = "
          f"{BUDGET_CPU_S:.0f} CPU-s for both stages and one sampling run.\n")
    rows = sorted(rows, key=lambda r: (-r["accuracy"], r["fd"]))
    if rows:
        r = rows[0]
        print(f"Judge ceiling (its accuracy on real held-out images) {r['ceiling']:.1%}; real-vs-real floors for "
              f"{r['n']} images: FD {fmt(r['fd_floor'])}, precision {r['precision_floor']:.2f}, recall "
              f"{r['recall_floor']:.2f}.\n")
    print(markdown_table(
        ["variant", "sampling", "recognised", "worst class", "cross-check", "FD", "precision", "recall",
         "held-out masked acc", "stage 1 PSNR", "CPU s (vq + mg + sample)", "in budget", "overrides"],
        [[r["name"], r["used"], f"{r['accuracy']:.1%}", f"{r['worst_class']:.0%}",
          f"{r['cross_check_accuracy']:.1%}", fmt(r["fd"]), f"{r['precision']:.2f}", f"{r['recall']:.2f}",
          fmt(r["eval_acc"] or float("nan")), fmt(r["vq_psnr"]),
          f"{r['vq_cpu']:.0f} + {r['mg_cpu']:.0f} + {r['sample_cpu']:.0f}",
          "yes" if r["total_cpu"] <= BUDGET_CPU_S else "NO",
          " ".join(x for x in (f"vq `{r['vq_args']}`" if r["vq_args"] else "",
                               f"mg `{r['mg_args']}`" if r["mg_args"] else "") if x)] for r in rows]))
    if stage1:
        print(f"\nStage-1 runs: the judge on each tokenizer's reconstructions of {stage1[0]['n']} real training "
              f"images (what a faithful generator on that tokenizer can reach; the FD is what its blur costs).\n")
        print(markdown_table(
            ["stage-1 overrides", "held-out PSNR", "recognised", "worst class", "FD", "precision", "recall",
             "CPU s"],
            [[f"`{r['vq_args']}`" if r["vq_args"] else "preset", fmt(r["vq_psnr"]), f"{r['accuracy']:.1%}",
              f"{r['worst_class']:.0%}", fmt(r["fd"]), f"{r['precision']:.2f}", f"{r['recall']:.2f}",
              f"{r['vq_cpu']:.0f}"] for r in sorted(stage1, key=lambda r: r["fd"])]))


if __name__ == "__main__":
    sys.exit(main())
