"""`export_dataset.py`: write a dataset split at training resolution as reference images for FID.

    python export_dataset.py --data cifar10 --split train --image-size 32 --out refs/cifar10-train

gives refs/cifar10-train/images/000000.png ... (lossless, one flat folder) and
refs/cifar10-train/data.npz with `arr_0` uint8 (n, h, w, 3) and, for labelled data, `labels` (n,).

Images stream to disk one at a time, so memory does not grow with the split. Nothing half-written is ever left
under a final name: every file is written under a hidden `.NAME.partial` beside it and renamed when whole, and
data.npz comes last, so its presence says the export finished. A failed or interrupted export (a full disk,
Ctrl-C) removes what it wrote.
"""

import argparse
import contextlib
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .cli import check_out_path, exit_on_clear_error
from .data import add_data_args, load_dataset, loader_options
from .images import to_uint8
from .runs import reporting_disk_full


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


def partial_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: hidden, in the same folder, matching no *.png."""
    return path.with_name(f".{path.name}.partial")


def check_out(out: Path, overwrite: bool) -> list[Path]:
    """What an earlier export left in OUT: PNGs (refused unless --overwrite: extra files skew FID), data.npz, and
    the .partial files of a killed one."""
    old = sorted((out / "images").glob("*.png"))
    if old and not overwrite:
        sys.exit(f"error: {out / 'images'} already holds {len(old)} PNG files; pick a new --out or pass --overwrite")
    leftovers = [*(out / "images").glob(".*.partial"), *out.glob(".*.partial"), out / "data.npz"]
    return old + [p for p in leftovers if p.is_file()]


class NpzWriter:
    """An .npz in np.savez's layout (uncompressed .npy members) written one row at a time.

    `arr_0` (n, *row_shape) streams into the archive; labels wait in an unnamed temporary file beside it (8 bytes
    an image) and follow as `labels` in `finish`."""

    def __init__(self, path: Path, n: int, row_shape: tuple[int, ...], dtype, with_labels: bool):
        self.n = n
        self.zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.rows = self._member("arr_0", (n, *row_shape), dtype)
        self.labels = tempfile.TemporaryFile(dir=path.parent) if with_labels else None

    def _member(self, name: str, shape: tuple[int, ...], dtype):
        member = self.zip.open(f"{name}.npy", "w", force_zip64=True)  # as np.savez does (numpy gh-10776)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(member, header)
        return member

    def append(self, row: np.ndarray, label: int) -> None:
        self.rows.write(np.ascontiguousarray(row).data)
        if self.labels is not None:
            self.labels.write(np.int64(label).tobytes())

    def finish(self) -> None:
        """Complete the archive once all n rows are in."""
        self.rows.close()
        if self.labels is not None:
            self.labels.seek(0)
            with self._member("labels", (self.n,), np.int64) as member:
                shutil.copyfileobj(self.labels, member)
            self.labels.close()
        self.zip.close()

    def abort(self) -> None:
        """Close everything; the caller removes the incomplete archive."""
        with contextlib.suppress(Exception):  # a second full-disk error while closing says nothing new
            self.rows.close()
            self.zip.close()  # closes the file even when writing its directory fails
        if self.labels is not None:
            self.labels.close()


def png_path(out: Path, i: int) -> Path:
    return out / "images" / f"{i:06d}.png"


def save_png(pixels: np.ndarray, path: Path) -> None:
    """uint8 (h, w, 3) -> a lossless PNG at `path`, renamed into place when whole."""
    partial = partial_path(path)
    Image.fromarray(pixels).save(partial, format="PNG")
    partial.replace(path)


def write_export(ds, n: int, size: int, out: Path, desc: str) -> None:
    """Images 0..n-1 of `ds` to OUT/images/NNNNNN.png and OUT/data.npz, one image in memory at a time."""
    npz = out / "data.npz"
    writer, started = None, 0  # started: PNGs begun, removed again on failure
    try:
        writer = NpzWriter(partial_path(npz), n, (size, size, 3), np.uint8, with_labels=bool(ds.num_classes))
        for i in tqdm(range(n), desc=desc, unit="img"):
            x, label = ds[i]
            pixels = to_uint8(x[None])[0].numpy()  # (h, w, 3)
            started = i + 1
            save_png(pixels, png_path(out, i))
            writer.append(pixels, label)
        writer.finish()
        partial_path(npz).replace(npz)
    except BaseException:  # a full disk, Ctrl-C: no part of this export stays behind
        if writer is not None:
            writer.abort()
        partial_path(npz).unlink(missing_ok=True)
        for i in range(started):
            png_path(out, i).unlink(missing_ok=True)
            partial_path(png_path(out, i)).unlink(missing_ok=True)
        raise


def export(argv=None) -> None:
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
    for f in stale:  # data.npz too: it must never sit beside PNGs of another export
        f.unlink()
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    with reporting_disk_full(str(args.out), "the partial export was removed"):
        write_export(ds, n, args.image_size, args.out, desc=f"export {args.data} {args.split}")
    print(f"wrote {n} images of {args.image_size}x{args.image_size} to {args.out / 'images'} and "
          f"{args.out / 'data.npz'}")


def main(argv=None) -> None:
    exit_on_clear_error(export, argv)


if __name__ == "__main__":
    main()
