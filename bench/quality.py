"""Sample quality against decoding settings, judged by a classifier trained on real images.

    python bench/quality.py --train                              # train both tiny stages on shapes first (~13 CPU min)
    python bench/quality.py --vq runs/vq --maskgit runs/maskgit  # score runs trained with --critic self
    python bench/quality.py --quick                              # seconds: untrained models, a smoke test

The judge is independent of the generator: a small CNN trained on the real training images of the run's dataset
(labelled; `shapes` by default). For class-conditional samples of every setting it reports the class accuracy
(the classifier agrees with the requested label) and a Frechet distance between the classifier's penultimate
features of the samples and of the real held-out images (FID's formula in a small, dataset-specific feature
space). Reference rows give the floor: real training images, and the tokenizer's reconstructions of held-out
images (no generator can beat its decoder). The spread after FD is a bootstrap over the samples.

Settings vary one thing at a time around confidence / cosine / no guidance: steps x schedule (the MaskGIT paper's
cosine-vs-linear claim), steps x sampler, and guidance x sampler at 8 steps (`--full` crosses everything).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import REPO, autocast, fmt, machine_line, markdown_table, pick_device

BASE = dict(strategy="confidence", schedule="cosine", cfg=0.0)
FEW_STEPS = 8  # "few steps" for the cosine-vs-linear verdict: every swept step count up to this


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
    p.add_argument("--full", action="store_true", help="every combination instead of one factor at a time")
    p.add_argument("--batch", type=int, default=250, help="samples per generate() call")
    p.add_argument("--clf-epochs", type=int, default=2, help="classifier training epochs over the real train split")
    p.add_argument("--bootstrap", type=int, default=50, help="bootstrap resamples for the FD spread (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the classifier and of every setting's draws")
    p.add_argument("--raw", action="store_true", help="use the raw weights rather than the EMA")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="few samples, small classifier data: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.num, args.batch, args.steps, args.bootstrap = 20, 20, [4, 8], 10
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
    from vqvae.data import SHAPES_CLASSES, make_shapes
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

    model, vq, config = load_maskgit(args.maskgit, device=device, ema=not args.raw)
    if args.vq:
        vq = load_tokenizer(args.vq, device=device)
        if (vq.codebook_size, tuple(vq.grid_size)) != (model.codebook_size, model.grid):
            raise SystemExit(f"error: --vq {args.vq} does not match the codes {args.maskgit} was trained on")
    if model.num_classes == 0:
        raise SystemExit("error: the MaskGIT run is unconditional: class accuracy needs a class-conditional model")
    return model, vq, config["data"], list(config["classes"])


# ----------------------------------------------------------------------------- the judge

class Classifier(nn.Module):
    """Small CNN: images (b, 3, S, S) in [-1, 1] -> penultimate features (b, feat) -> class logits (b, classes)."""

    def __init__(self, num_classes: int, width: int = 32, feat: int = 64):
        super().__init__()

        def block(c_in, c_out):  # conv, norm, ReLU, halve the resolution
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(
            *block(3, width), *block(width, 2 * width), *block(2 * width, 4 * width),
            nn.Conv2d(4 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * width, feat),  # the Frechet distance uses these, before the ReLU: no dead (constant) features
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feat, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def real_split(data: dict, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images (n, 3, S, S) in [-1, 1] and labels of a split, the first `limit` of them if given."""
    from vqvae.data import ShapesDataset, load_dataset

    size = data["image_size"]
    if data["data"] == "shapes" and limit:
        dataset = ShapesDataset(size, split, num_images=limit)  # generates only what is asked for
    else:
        dataset = load_dataset(data["data"], size, split, root=data.get("data_root"))
    count = min(limit or len(dataset), len(dataset))
    if dataset.images.shape[-1] == size:
        images = dataset.images[:count].float() / 127.5 - 1
    else:
        images = torch.stack([dataset[i][0] for i in range(count)])
    labels = dataset.labels[:count]
    if (labels < 0).any():
        raise SystemExit(f"error: {data['data']} is unlabelled: class accuracy needs labels")
    return images, labels


def train_classifier(images, labels, num_classes: int, epochs: int, device, seed: int) -> Classifier:
    """AdamW with a one-cycle learning rate and random horizontal flips, batches of 128."""
    torch.manual_seed(seed)
    clf = Classifier(num_classes).to(device)
    batches = math.ceil(len(images) / 128)
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * batches)
    gen = torch.Generator().manual_seed(seed)
    clf.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for idx in order.split(128):
            x = images[idx]
            x = torch.where(torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5, x.flip(-1), x).to(device)
            loss = F.cross_entropy(clf(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return clf.eval()


@torch.inference_mode()
def judge(clf: Classifier, images: torch.Tensor, device) -> tuple[np.ndarray, np.ndarray]:
    """Predicted classes (n,) and float64 penultimate features (n, feat) of images in [-1, 1]."""
    preds, feats = [], []
    for chunk in images.split(500):
        f = clf.features(chunk.to(device).float())
        preds.append(clf.head(f).argmax(-1).cpu())
        feats.append(f.double().cpu())
    return torch.cat(preds).numpy(), torch.cat(feats).numpy()


def gaussian(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), as in FID.

    S_a S_b is similar to the symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2), so the trace of its square root is the
    sum of the square roots of that matrix's eigenvalues: two `eigh` calls, exact, and much faster than a general
    matrix square root (scipy.linalg.sqrtm), which the tests compare against."""
    (mu_a, s_a), (mu_b, s_b) = a, b
    lam, vec = np.linalg.eigh(s_a)
    root_a = (vec * np.sqrt(lam.clip(min=0))) @ vec.T  # S_a^(1/2)
    middle = root_a @ s_b @ root_a
    tr_covmean = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean)


def fd_with_spread(feats: np.ndarray, real: tuple, resamples: int, seed: int) -> tuple[float, float]:
    """Frechet distance of feats to the real Gaussian and its bootstrap standard deviation over the samples."""
    fd = frechet(gaussian(feats), real)
    if resamples < 2:
        return fd, float("nan")
    rng = np.random.default_rng(seed)  # a local generator: never numpy's global one
    boot = [frechet(gaussian(feats[rng.integers(0, len(feats), len(feats))]), real) for _ in range(resamples)]
    return fd, float(np.std(boot))


# ----------------------------------------------------------------------------- the sweep

def settings(args, has_critic: bool) -> list[dict]:
    samplers = [s for s in args.samplers if s != "critic" or has_critic]
    if len(samplers) < len(args.samplers):
        print("the model has no token critic: skipping the critic sampler", file=sys.stderr)
    if args.full:
        grid = [dict(strategy=st, schedule=sc, cfg=w, steps=n)
                for st, sc, w, n in itertools.product(samplers, args.schedules, args.cfg, args.steps)]
    else:
        mid = FEW_STEPS if FEW_STEPS in args.steps else args.steps[len(args.steps) // 2]
        base = {**BASE, "strategy": samplers[0] if BASE["strategy"] not in samplers else BASE["strategy"]}
        grid = [{**base, "schedule": sc, "steps": n} for sc in args.schedules for n in args.steps]
        grid += [{**base, "strategy": st, "steps": n} for st in samplers for n in args.steps]
        grid += [{**base, "strategy": st, "cfg": w, "steps": mid} for st in samplers for w in args.cfg]
    unique = []
    for s in grid:
        s = {**s, "cfg": float(s["cfg"])}
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
                                   schedule=setting["schedule"], cfg=setting["cfg"], generator=gen)
            images.append(vq.decode(codes.view(len(chunk), *vq.grid_size)).float().clamp(-1, 1).cpu())
    return torch.cat(images), labels.numpy()


def cosine_verdict(rows: list[dict], steps: list[int]) -> str:
    """Does cosine beat linear at few steps (Chang et al. 2022, Fig. 8)? Judged on FD, differences beyond 2 sigma."""
    few = [n for n in steps if n <= FEW_STEPS] or steps[:1]
    lines, wins, losses = [], 0, 0
    for n in few:
        pick = {r["schedule"]: r for r in rows if r["steps"] == n and r["strategy"] == BASE["strategy"]
                and r["cfg"] == BASE["cfg"]}
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

    small = 400 if args.quick else None
    t0 = time.perf_counter()
    train_x, train_y = real_split(data, "train", small)
    test_x, test_y = real_split(data, "test", 100 if args.quick else None)
    print(f"training the judge on {len(train_x)} real images", file=sys.stderr, flush=True)
    clf = train_classifier(train_x, train_y, num_classes, 1 if args.quick else args.clf_epochs, device, args.seed)
    clf_seconds = time.perf_counter() - t0
    test_pred, test_feats = judge(clf, test_x, device)
    real = gaussian(test_feats)
    held_out_acc = float((test_pred == test_y.numpy()).mean())

    # floors: real training images (same count as the samples) and the tokenizer's reconstructions
    n_ref = min(args.num, len(train_x))
    ref_rows = []
    pred, feats = judge(clf, train_x[:n_ref], device)
    ref_rows.append(("real train images", n_ref, float((pred == train_y[:n_ref].numpy()).mean()),
                     *fd_with_spread(feats, real, args.bootstrap, args.seed)))
    with torch.inference_mode(), autocast(device):
        recon = torch.cat([vq.decode(vq.encode(x.to(device))).float().clamp(-1, 1).cpu()
                           for x in test_x[: args.num].split(args.batch)])
    pred, feats = judge(clf, recon, device)
    ref_rows.append(("tokenizer reconstructions (held-out)", len(recon),
                     float((pred == test_y[: len(recon)].numpy()).mean()),
                     *fd_with_spread(feats, real, args.bootstrap, args.seed)))

    rows = []
    for setting in settings(args, model.has_critic):
        print(f"sampling {setting}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        images, labels = generate(model, vq, setting, args.num, num_classes, args.batch, args.seed, device)
        seconds = time.perf_counter() - start
        pred, feats = judge(clf, images, device)
        fd, fd_std = fd_with_spread(feats, real, args.bootstrap, args.seed)
        rows.append({**setting, "acc": float((pred == labels).mean()), "fd": fd, "fd_std": fd_std, "seconds": seconds})

    source = "untrained tiny models" if args.untrained else f"{args.maskgit}" + (" (raw weights)" if args.raw else "")
    headers = ["sampler", "schedule", "steps", "guidance", "class accuracy", "FD (features)", "sampling s"]
    table = [[r["strategy"], r["schedule"], r["steps"], fmt(r["cfg"], 2),
              f"{r['acc']:.1%} ± {_binom(r['acc'], args.num)}", f"{fmt(r['fd'])} ± {fmt(r['fd_std'], 2)}",
              fmt(r["seconds"])] for r in rows]
    table += [[f"*{name}*", "-", "-", "-", f"{acc:.1%}", f"{fmt(fd)} ± {fmt(std, 2)}", "-"]
              for name, n, acc, fd, std in ref_rows]
    print("\n".join([
        f"## Sample quality on `{data['data']}` ({source}), {args.num} class-conditional samples per setting", "",
        machine_line(device), "",
        f"Judge: a CNN trained on {len(train_x)} real training images for "
        f"{1 if args.quick else args.clf_epochs} epoch(s) ({clf_seconds:.0f} s with data); held-out accuracy on "
        f"{len(test_x)} real images: **{held_out_acc:.1%}**. FD: Frechet distance of its {real[0].shape[0]}-d "
        f"penultimate features to those of the {len(test_x)} real held-out images (lower is better; ± bootstrap "
        f"std). Class accuracy ± binomial std.", "",
        markdown_table(headers, table), "",
        cosine_verdict(rows, args.steps), "",
    ]))


def _binom(p: float, n: int) -> str:
    return f"{math.sqrt(max(p * (1 - p), 0.0) / n):.1%}"


if __name__ == "__main__":
    main()
