"""Does the tiny setup learn? Stage-1 reconstructions and stage-2 class-conditional samples, checked in one run.

    python bench/learning.py                         # real handwritten digits (scikit-learn's, at 32 px)
    python bench/learning.py --data shapes
    python bench/learning.py --data path/to/labelled/folder --work /tmp/learning
    python bench/learning.py --quick                 # seconds-to-minutes smoke test of every step; no targets
    python bench/learning.py --vq-args "--steps 400" --mg-args "--steps 800 --lr 2e-3"   # try preset overrides

(A) `train_vq.py --preset tiny`: held-out PSNR >= 25 dB and codebook usage >= 50% at the run's last evaluation,
within 3 CPU-minutes.
(B) `train_maskgit.py --preset tiny` (class-conditional) on that tokenizer, then `sample.py` at 8 steps, balanced
over the classes: >= 90% of the samples recognised as the class they were asked for by a classifier trained on
real images only (digits: an RBF SVM on 8x8 greyscale; anything else: a small CNN), with both stages, encoding
and sampling together within 10 CPU-minutes.

CPU time is the user+sys time of the child processes (getrusage), the fair figure on a shared machine; wall time
is printed too. The children run with --threads intra-op threads (default 1): on a busy machine extra threads
spin while they wait for each other, which costs CPU time without saving wall time.

Both stages train on horizontally mirrored copies as well as the originals, so a sample may come out mirrored
(a mirrored 3 is a fair sample of that training distribution). The classifier that decides the target is
therefore trained on the real training images and their mirror images; its accuracy on real held-out images,
as they are and mirrored, is printed. A strict figure beside it comes from a second classifier trained on the
originals only, which counts mirrored samples of asymmetric classes as wrong.

Everything lands in --work (default: a new temporary folder): digits/, logs/, vq/, maskgit/, samples_cfg*/.
The run folders vq/, maskgit/ and samples_cfg*/ there are replaced on every run.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import REPO, cpu_model, fmt, markdown_table, usable_cores, verdict
from vqvae.data import load_dataset

TARGET_PSNR, TARGET_USAGE, TARGET_VQ_CPU_S = 25.0, 0.5, 180.0
TARGET_ACCURACY, TARGET_TOTAL_CPU_S = 0.9, 600.0
SAMPLE_STEPS = 8
QUICK_VQ = ["--steps", "20", "--eval-every", "10", "--save-every", "20", "--warmup-steps", "5"]
QUICK_MG = ["--steps", "20", "--eval-every", "10", "--sample-every", "20", "--save-every", "20",
            "--warmup-steps", "5"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="'digits' (made by bench/make_digits.py), 'shapes', or a "
                                                   "folder of images in class subfolders")
    p.add_argument("--work", type=Path, help="working folder (default: a new temporary folder)")
    p.add_argument("--quick", action="store_true", help="tiny step counts: a smoke test of every step, no targets")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP/MKL threads of the training and sampling processes (0: leave them unset)")
    p.add_argument("--per-class", type=int, default=50, help="samples per class")
    p.add_argument("--cfg", type=float, nargs="+", default=[0.0, 3.0], help="guidance scales to sample with")
    p.add_argument("--classifier", choices=("auto", "svm", "cnn"), default="auto",
                   help="svm: RBF SVM on 8x8 greyscale (digits); cnn: a small CNN on the pixels; auto: svm for "
                        "digits, cnn otherwise")
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
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        with open(log, "w") as fh:
            rc = subprocess.run([sys.executable, *args], cwd=REPO, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL).returncode
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if rc:
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
            raise SystemExit(f"error: {' '.join(args[:1])} failed (exit {rc}); end of {log}:\n{tail}")
        print(f"  {name}: {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
        return wall, cpu


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


# ----------------------------------------------------------------------------- classifiers on real images

def as_tensor(dataset) -> tuple[torch.Tensor, np.ndarray]:
    """All images (n, 3, S, S) in [-1, 1] and labels (n,) of a dataset."""
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return images, dataset.labels.numpy()


def uint8_to_images(pixels: np.ndarray) -> torch.Tensor:
    """sample.py's uint8 (n, H, W, 3) -> float (n, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


class SVMClassifier:
    """RBF SVM on greyscale images area-averaged to 8x8, ink 0..16 (the resolution of the original digit scans)."""

    name = "RBF SVM on 8x8 greyscale (scikit-learn)"

    def __init__(self):
        from sklearn.svm import SVC

        self.svm = SVC(C=10.0, gamma="scale")

    @staticmethod
    def features(images: torch.Tensor) -> np.ndarray:
        grey = images.mean(1, keepdim=True)  # (n, 1, H, W)
        small = F.adaptive_avg_pool2d(grey, 8)  # (n, 1, 8, 8)
        return ((small + 1) * 8).flatten(1).numpy()  # (n, 64) in [0, 16]

    def fit(self, images: torch.Tensor, labels: np.ndarray) -> None:
        self.svm.fit(self.features(images), labels)

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.svm.predict(self.features(images))


class CNNClassifier:
    """A small conv net (three conv-BN-ReLU blocks, global average pool) trained with AdamW for a few epochs."""

    name = "small CNN (3 conv blocks, torch)"

    def __init__(self, num_classes: int, epochs: int = 4, width: int = 24, seed: int = 0):
        torch.manual_seed(seed)

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.net = nn.Sequential(*block(3, width), nn.MaxPool2d(2), *block(width, 2 * width), nn.MaxPool2d(2),
                                 *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4 * width, num_classes))
        self.epochs, self.seed = epochs, seed

    def fit(self, images: torch.Tensor, labels: np.ndarray, batch_size: int = 128) -> None:
        labels = torch.from_numpy(labels)
        steps = self.epochs * -(-len(images) // batch_size)
        opt = torch.optim.AdamW(self.net.parameters(), lr=3e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
        gen = torch.Generator().manual_seed(self.seed)
        self.net.train()
        for _ in range(self.epochs):
            for idx in torch.randperm(len(images), generator=gen).split(batch_size):
                loss = F.cross_entropy(self.net(images[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        self.net.eval()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> np.ndarray:
        return torch.cat([self.net(chunk).argmax(-1) for chunk in images.split(512)]).numpy()


def train_classifier(kind: str, data: str, image_size: int, mirrors: bool) -> tuple[object, dict]:
    """A classifier fit on the real training split (plus its mirror images if `mirrors`), and its held-out accuracy
    on the real held-out split as is and mirrored."""
    train_x, train_y = as_tensor(load_dataset(data, image_size, "train"))
    test_x, test_y = as_tensor(load_dataset(data, image_size, "test"))
    if train_y.min() < 0:
        raise SystemExit(f"error: {data} is unlabelled: the class-conditional check needs class subfolders")
    num_classes = int(train_y.max()) + 1
    if mirrors:
        train_x, train_y = torch.cat([train_x, train_x.flip(-1)]), np.concatenate([train_y, train_y])
    start = time.process_time()
    classifier = SVMClassifier() if kind == "svm" else CNNClassifier(num_classes)
    classifier.fit(train_x, train_y)
    return classifier, {"name": classifier.name, "num_classes": num_classes, "train": len(train_y),
                        "test": len(test_y), "acc": float((classifier.predict(test_x) == test_y).mean()),
                        "acc_mirrored": float((classifier.predict(test_x.flip(-1)) == test_y).mean()),
                        "cpu_s": time.process_time() - start}


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
    mg_extra = (QUICK_MG if args.quick else []) + shlex.split(args.mg_args)
    mg_wall, mg_cpu = child.run("train_maskgit", ["train_maskgit.py", "--vq", str(vq_dir), "--preset", "tiny",
                                                  "--class-cond", "true", "--out", str(mg_dir), "--cpu", *mg_extra])
    mg_last = read_metrics(mg_dir)[-1]
    mg_run = json.loads((mg_dir / "config.json").read_text())
    num_classes, image_size = mg_run["num_classes"], mg_run["data"]["image_size"]

    per_class = 5 if args.quick else args.per_class
    print(f"sampling: sample.py --steps {SAMPLE_STEPS}, {per_class} per class", flush=True)
    sampled = []
    for w in args.cfg:
        out = work / f"samples_cfg{w:g}"
        wall, cpu = child.run(f"sample_cfg{w:g}", [
            "sample.py", "--checkpoint", str(mg_dir), "--out", str(out), "--num", str(per_class * num_classes),
            "--batch-size", "100", "--steps", str(SAMPLE_STEPS), "--cfg", str(w), "--class", "all", "--cpu",
            *shlex.split(args.sample_args)])
        with np.load(out / "samples.npz") as npz:
            sampled.append((w, wall, cpu, npz["arr_0"], npz["labels"]))

    kind = args.classifier if args.classifier != "auto" else ("svm" if args.data == "digits" else "cnn")
    print(f"classifiers ({kind}) on real images", flush=True)
    classifier, clf = train_classifier(kind, data, image_size, mirrors=True)
    strict, strict_clf = train_classifier(kind, data, image_size, mirrors=False)
    clf["strict_acc"] = strict_clf["acc"]
    rows = []
    for w, wall, cpu, pixels, labels in sampled:
        images = uint8_to_images(pixels)
        predicted = classifier.predict(images)
        per_class_acc = [float((predicted[labels == c] == c).mean()) for c in range(num_classes)]
        rows.append({"cfg": w, "wall": wall, "cpu": cpu, "acc": float((predicted == labels).mean()),
                     "acc_strict": float((strict.predict(images) == labels).mean()),
                     "worst_class": min(per_class_acc), "n": len(labels)})

    report(args, work, data, vq_metrics, vq_wall, vq_cpu, mg_last, mg_wall, mg_cpu, clf, rows)


def report(args, work, data, vq_metrics, vq_wall, vq_cpu, mg_last, mg_wall, mg_cpu, clf, rows) -> None:
    vq_last = vq_metrics[-1]
    threads = args.threads if args.threads > 0 else "default"
    print(f"\n## Learning check: --data {args.data}{' (quick: no targets)' if args.quick else ''}\n")
    print(f"Machine: CPU {cpu_model()} ({usable_cores()} cores usable), torch {torch.__version__}, child threads "
          f"{threads}. Data: {data}. Overrides: vq [{args.vq_args}] maskgit [{args.mg_args}] "
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
          f"{mg_last.get('eval_masked_acc', float('nan')):.3f}, masked loss {mg_last.get('eval_loss', float('nan')):.3f} "
          f"at step {mg_last['step']}\n")
    print(f"classifier: {clf['name']}, trained on {clf['train']} real images (half of them mirrored; "
          f"{clf['cpu_s']:.0f} s CPU); held-out real accuracy {clf['acc']:.1%} as is, {clf['acc_mirrored']:.1%} "
          f"mirrored ({clf['test']} images, {clf['num_classes']} classes). Strict classifier (originals only): "
          f"{clf['strict_acc']:.1%} held-out\n")
    print(markdown_table(
        ["cfg", "samples", "recognised", "recognised (strict)", "worst class", "sampling CPU (s)",
         "sampling wall (s)", "total CPU, both stages + sampling (s)"],
        [[fmt(r["cfg"]), r["n"], f"{r['acc']:.1%}", f"{r['acc_strict']:.1%}", f"{r['worst_class']:.0%}",
          fmt(r["cpu"]), fmt(r["wall"]), fmt(vq_cpu + mg_cpu + r["cpu"])] for r in rows]))
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
        total = vq_cpu + mg_cpu + r["cpu"]
        print(verdict(f"cfg {r['cfg']:g}: >= {TARGET_ACCURACY:.0%} of samples recognised as their class",
                      r["acc"] >= TARGET_ACCURACY, f"{r['acc']:.1%} ({r['acc_strict']:.1%} strict)"))
        print(verdict(f"cfg {r['cfg']:g}: both stages + sampling within {TARGET_TOTAL_CPU_S / 60:g} CPU-minutes",
                      total <= TARGET_TOTAL_CPU_S, f"{total:.0f} s CPU"))


if __name__ == "__main__":
    main()
