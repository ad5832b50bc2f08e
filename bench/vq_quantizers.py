"""Compare the two tokenizer bottlenecks, VectorQuantize ("vq") and FSQ, at equal steps and comparable codebook size.

Trains a preset (default `tiny`) once per quantizer with a plain in-process torch loop, on the built-in
`shapes` set and, with --data, on a folder of images too; then prints held-out PSNR, codebook usage and
perplexity, and the training time. Example (a few CPU minutes):

    python bench/vq_quantizers.py --steps 600 --data path/to/images
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from vqvae.config import VQ_PRESETS, VQConfig, VQTrainConfig  # noqa: E402
from vqvae.data import load_dataset  # noqa: E402
from vqvae.metrics import codebook_stats, psnr  # noqa: E402
from vqvae.model import VQVAE  # noqa: E402
from vqvae.training import lr_schedule  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    p.add_argument("--data", default=None, help="a folder of images, benchmarked after `shapes`")
    p.add_argument("--no-shapes", action="store_true", help="skip the built-in shapes set")
    p.add_argument("--preset", default="tiny", choices=sorted(VQ_PRESETS))
    p.add_argument("--codebook-size", type=int, default=None, help="codes of the vq run (default: the preset's)")
    p.add_argument("--fsq-levels", default=None,
                   help="levels of the fsq run, e.g. 8,8,8 = 512 codes (default: the preset's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args()


def as_tensor(dataset, limit: int | None = None):
    """A whole dataset as one float tensor (n, 3, S, S) in [-1, 1]; the benchmark sets are small."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return torch.stack([dataset[i][0] for i in range(n)])


@torch.no_grad()
def evaluate(model: VQVAE, images, batch_size: int = 256):
    """Held-out PSNR (dB) of decode(encode(x)), and codebook usage / perplexity over all held-out codes."""
    model.eval()
    codes = torch.cat([model.encode(x) for x in images.split(batch_size)])
    recon = torch.cat([model.decode(c) for c in codes.split(batch_size)])
    model.train()
    usage, perplexity = codebook_stats(codes, model.codebook_size)
    return psnr(recon, images), usage, perplexity


def train(model_cfg: VQConfig, train_cfg: VQTrainConfig, images):
    """Train from scratch on `images` for train_cfg.steps; return (model, seconds, seconds per step)."""
    torch.manual_seed(train_cfg.seed)
    model = VQVAE(model_cfg)
    # the optimizer of train_vq.py; no flips or other augmentation in this short comparison
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                            betas=(0.9, 0.99))
    schedule = lr_schedule(opt, train_cfg.lr_schedule, train_cfg.warmup_steps, train_cfg.steps)
    g = torch.Generator().manual_seed(train_cfg.seed)
    start = time.perf_counter()
    for _ in range(train_cfg.steps):
        batch = images[torch.randint(len(images), (train_cfg.batch_size,), generator=g)]
        loss = model(batch).losses.total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        opt.step()
        schedule.step()
    seconds = time.perf_counter() - start
    return model, seconds, seconds / train_cfg.steps


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base_model, base_train = VQ_PRESETS[args.preset]
    levels = (tuple(int(level) for level in args.fsq_levels.split(",")) if args.fsq_levels
              else base_model.fsq_levels)
    runs = {
        "vq": dataclasses.replace(base_model, quantizer="vq",
                                  codebook_size=args.codebook_size or base_model.codebook_size),
        "fsq": dataclasses.replace(base_model, quantizer="fsq", fsq_levels=levels),
    }
    train_cfg = dataclasses.replace(base_train, steps=args.steps)
    sources = ([] if args.no_shapes else ["shapes"]) + ([args.data] if args.data else [])
    if not sources:
        sys.exit("nothing to benchmark: drop --no-shapes or give --data")

    print(f"preset {args.preset}, {args.steps} steps x batch {train_cfg.batch_size}, lr {train_cfg.lr}, "
          f"{torch.get_num_threads()} threads")
    print(base_model)
    rows, start = [], time.perf_counter()
    for source in sources:
        train_images = as_tensor(load_dataset(source, base_model.image_size, "train"))
        test_images = as_tensor(load_dataset(source, base_model.image_size, "test"), train_cfg.num_eval_images)
        print(f"\n{source}: {len(train_images)} train / {len(test_images)} held-out images")
        for name, model_cfg in runs.items():
            model, seconds, per_step = train(model_cfg, train_cfg, train_images)
            db, usage, perplexity = evaluate(model, test_images)
            rows.append((source, name, model.codebook_size, db, usage, perplexity, seconds, per_step))
            print(f"  {name:>3}: PSNR {db:5.2f} dB  usage {usage:6.1%}  perplexity {perplexity:6.1f}  "
                  f"({seconds:.0f} s, {per_step * 1000:.0f} ms/step)", flush=True)

    print("\n| data | quantizer | codes | held-out PSNR (dB) | usage | perplexity | train s |")
    print("|---|---|---|---|---|---|---|")
    for source, name, size, db, usage, perplexity, seconds, _ in rows:
        print(f"| {source} | {name} | {size} | {db:.2f} | {usage:.1%} | {perplexity:.1f} | {seconds:.0f} |")
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
