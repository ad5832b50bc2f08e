"""Write a flat folder of small real-photograph crops, offline, for the tokenizer benchmarks (bench/vq_gan.py).

    python bench/make_photos.py --out data/photos64 --size 64 --num 3000

NOT a diverse dataset: every file is a crop of one of about 20 photographs that pip packages ship inside
themselves (nothing is downloaded): scikit-image's `skimage.data` (astronaut, camera, brick, grass, gravel, coins,
moon, clock, chelsea, coffee, rocket, hubble_deep_field, immunohistochemistry, retina, cell, page, the left
stereo_motorcycle view) when scikit-image is installed, and scikit-learn's `load_sample_images()` (china, flower).
The greyscale ones are repeated over three channels. Each crop is a square at a random position and a random
side between `--size` pixels (native detail) and the photo's short side (the whole photo, downscaled), drawn
log-uniformly, then resized to `--size` with an antialiasing (Lanczos) filter. Photos are drawn in turn, so each
contributes about the same number of crops. Seeded: the same arguments write the same files.

The toolkit's folder loader holds out about 10% of the files by a hash of their names (core.data). Held-out
crops are new crops, but of the same ~20 photographs the training crops come from (and may overlap them): the
held-out figures measure reconstruction of unseen views of seen scenes, not generalisation to new scenes.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image

# skimage.data functions that read files bundled with scikit-image (no pooch download); photographs only
SKIMAGE_PHOTOS = ("astronaut", "camera", "brick", "grass", "gravel", "coins", "moon", "clock", "chelsea", "coffee",
                  "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cell", "page", "stereo_motorcycle")


def _rgb(array) -> np.ndarray:
    """(H, W, 3) uint8 from a greyscale, RGB or RGBA array of any integer/float/bool type."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = a.astype(np.float64)
        a = (255 * (a - a.min()) / max(a.max() - a.min(), 1e-12)).round().astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def load_photos() -> dict[str, np.ndarray]:
    """The bundled photographs that this machine has, by name, as (H, W, 3) uint8 arrays."""
    photos = {}
    try:
        from skimage import data as skdata
    except ImportError:
        skdata = None
    if skdata is not None:
        for name in SKIMAGE_PHOTOS:
            try:
                image = getattr(skdata, name)()
            except Exception:  # noqa: BLE001 - not bundled in this version (would need a download): skip it
                continue
            if name == "stereo_motorcycle":
                image = image[0]  # (left, right, disparity): one view
            photos[name] = _rgb(image)
    try:
        from sklearn.datasets import load_sample_images

        sample = load_sample_images()
        for filename, image in zip(sample.filenames, sample.images):
            photos[Path(filename).stem] = _rgb(image)
    except ImportError:
        pass
    return photos


def random_crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> Image.Image:
    """A square crop of side log-uniform in [size, short side] at a uniform position, resized to size x size."""
    h, w = photo.shape[:2]
    short = min(h, w)
    lo = min(size, short)
    side = int(round(math.exp(rng.uniform(math.log(lo), math.log(short)))))
    side = max(lo, min(side, short))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[top:top + side, left:left + side])
    return crop if side == size else crop.resize((size, size), Image.LANCZOS)


def make_photos(out: Path, size: int = 64, num: int = 3000, seed: int = 0) -> list[str]:
    """Write `num` crops as OUT/NAME_IIIII.png; returns the names of the photographs used."""
    photos = load_photos()
    if not photos:
        raise SystemExit("error: no bundled photographs found: pip install scikit-image (or scikit-learn)")
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(photos)
    rng = np.random.default_rng(seed)
    for i in range(num):
        name = names[i % len(names)]
        random_crop(photos[name], size, rng).save(out / f"{name}_{i:05d}.png")
    return names


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder to write (created; same-named files replaced)")
    p.add_argument("--size", type=int, default=64, help="side of the square crops, pixels")
    p.add_argument("--num", type=int, default=3000, help="number of crops")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    names = make_photos(args.out, args.size, args.num, args.seed)
    print(f"wrote {args.num} crops of {args.size} px from {len(names)} photographs ({', '.join(names)}) to "
          f"{args.out}")


if __name__ == "__main__":
    main()
