"""Write scikit-learn's handwritten digits as a labelled image folder: OUT/<digit>/<index>.png.

    python bench/make_digits.py --out data/digits --size 32

The 1797 digits are real 8x8 scans (UCI optdigits) bundled with scikit-learn, so this gives a
small folder of real, labelled images offline. Ink values 0..16 become 0..255: a white digit on
black, upscaled with bicubic interpolation and stored as RGB PNG.
"""

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output folder (one subfolder per digit)")
    p.add_argument("--size", type=int, default=32, help="side of the written images, in pixels")
    args = p.parse_args(argv)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("error: scikit-learn is needed: pip install scikit-learn")

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)  # (1797, 8, 8)
    for index, (img, digit) in enumerate(zip(pixels, digits.target)):
        folder = args.out / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        big = Image.fromarray(img, "L").resize((args.size, args.size), Image.Resampling.BICUBIC)
        big.convert("RGB").save(folder / f"{index:04d}.png")
    counts = Counter(int(t) for t in digits.target)
    print(f"wrote {len(pixels)} digits of {args.size}x{args.size} to {args.out}/<digit>/<index>.png; "
          f"per class: {dict(sorted(counts.items()))}")


if __name__ == "__main__":
    main()
