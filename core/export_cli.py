"""`export_dataset.py`: write a dataset split at training resolution as reference images for FID.

    python export_dataset.py --data cifar10 --split train --image-size 32 --out refs/cifar10-train

gives refs/cifar10-train/images/000000.png ... (lossless, one flat folder) and
refs/cifar10-train/data.npz with `arr_0` uint8 (n, h, w, 3) and, for labelled data, `labels` (n,).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .cli import check_out_path
from .data import add_data_args, load_dataset, loader_options
from .images import to_uint8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="export_dataset.py", description="Write a dataset split at training resolution "
                                "as reference images for FID.")
    p.add_argument("--data", required=True, help="'cifar10', 'shapes', a folder of images, or hf:NAME_OR_PATH")
    p.add_argument("--data-root", default=None, help="where cifar-10-batches-py lives (default ./data)")
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--image-size", type=int, required=True, help="side of the square images, in pixels")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--limit", type=int, default=None, help="export only the first N images")
    p.add_argument("--overwrite", action="store_true", help="replace PNGs left in OUT/images by an earlier export")
    add_data_args(p, crop=False)  # --verify-images, --image-cache, --image-cache-dir
    return p.parse_args(argv)


def check_out(out: Path, overwrite: bool) -> list[Path]:
    """PNGs an earlier export left in OUT/images; refuse to mix with them unless --overwrite (extra files skew FID)."""
    old = sorted((out / "images").glob("*.png"))
    if old and not overwrite:
        sys.exit(f"error: {out / 'images'} already holds {len(old)} PNG files; pick a new --out or pass --overwrite")
    return old


def main(argv=None) -> None:
    args = parse_args(argv)
    check_out_path(args.out)
    if args.limit is not None and args.limit < 1:
        sys.exit("error: --limit must be at least 1")
    stale = check_out(args.out, args.overwrite)
    try:
        ds = load_dataset(args.data, args.image_size, args.split, root=args.data_root, **loader_options(args))
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    n = len(ds) if args.limit is None else min(args.limit, len(ds))
    for f in stale:
        f.unlink()
    images_dir = args.out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)

    pixels = np.empty((n, args.image_size, args.image_size, 3), dtype=np.uint8)  # (n, h, w, 3)
    labels = np.empty(n, dtype=np.int64)
    for i in tqdm(range(n), desc=f"export {args.data} {args.split}", unit="img"):
        x, labels[i] = ds[i]
        pixels[i] = to_uint8(x[None])[0].numpy()
        Image.fromarray(pixels[i]).save(images_dir / f"{i:06d}.png")  # PNG is lossless
    extra = {"labels": labels} if ds.num_classes else {}
    np.savez(args.out / "data.npz", arr_0=pixels, **extra)
    print(f"wrote {n} images of {args.image_size}x{args.image_size} to {images_dir} and {args.out / 'data.npz'}")


if __name__ == "__main__":
    main()
