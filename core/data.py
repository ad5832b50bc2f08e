"""Image datasets, for both stages and the FID export: CIFAR-10, a procedural `shapes` set, and image folders.

Every dataset is held in memory as uint8 (the data sets this toolkit targets are small) and served
as `(image float32 (3, S, S) in [-1, 1], label int)`, label -1 when unlabelled. Datasets are
deterministic: no augmentation happens in `__getitem__`; training loops flip batches with
`random_hflip` and a seeded generator so that resuming reproduces the run exactly.
"""

import colorsys
import hashlib
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageDraw, ImageOps
from torch import Tensor
from torchvision.datasets import CIFAR10

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FOLDER_VERSION = 1  # bump when folder preprocessing changes, so fingerprints (and caches keyed on them) change
BUILTIN_DATASETS = ("cifar10", "shapes")  # names that win over folders of the same name
SHAPES_VERSION = 2  # bump when the shapes generator changes
SHAPES_CLASSES = [
    "circle", "square", "triangle", "cross", "ring",
    "diamond", "star", "horizontal bar", "vertical bar", "two dots",
]
SHAPES_SIZES = {"train": 10_000, "test": 1_000}
TEST_FRACTION = 0.1  # share of a folder's files held out as its test split


class ImageDataset(torch.utils.data.Dataset):
    """uint8 images in memory, served one at a time as float32 in [-1, 1].

    Images stored at another resolution than `image_size` (CIFAR-10 asked for at 64 px) are
    resized per item (bicubic, antialiased) so the stored copy stays the compact original.
    """

    def __init__(self, images: Tensor, labels: Tensor, classes: list[str], image_size: int,
                 paths: list[str] | None = None):
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3, images.shape
        assert labels.shape == (len(images),), (labels.shape, images.shape)
        self.images = images  # uint8 (n, 3, h, w)
        self.labels = labels.long()  # (n,), -1 = unlabelled
        self.classes = list(classes)
        self.image_size = image_size
        self.paths = paths  # source files relative to the folder, for folder datasets

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = self.images[i].float() / 127.5 - 1  # (3, h, w)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x[None], size=(self.image_size,) * 2, mode="bicubic",
                              antialias=True, align_corners=False)[0].clamp(-1, 1)
        return x, int(self.labels[i])


def load_dataset(data: str, image_size: int, split: str = "train", root: str | None = None) -> ImageDataset:
    """data is 'cifar10', 'shapes', or a path to a folder of images; split is 'train' or 'test' (held-out).

    `root` is where CIFAR-10 lives (default ./data); the other sources ignore it. The names
    'cifar10' and 'shapes' win over folders of the same name: write ./shapes for such a folder.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if data == "cifar10":
        return load_cifar10(root or "./data", image_size, split)
    if data == "shapes":
        return ShapesDataset(image_size, split)
    return load_folder(data, image_size, split)


def dataset_fingerprint(data: str, image_size: int, root: str | None = None) -> str:
    """Short hex digest that changes when the dataset's content changes (files added/removed/modified, size, source)."""
    h = hashlib.sha1(f"{data if data in BUILTIN_DATASETS else 'folder'}|{image_size}".encode())
    if data == "shapes":
        h.update(f"|v{SHAPES_VERSION}|{sorted(SHAPES_SIZES.items())}".encode())
    elif data == "cifar10":
        folder = Path(root or "./data").expanduser() / CIFAR10.base_folder
        names = [n for n, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
        if all((folder / n).is_file() for n in names):
            for n in names:
                st = (folder / n).stat()
                h.update(f"|{n}:{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            # not downloaded yet: what download=True fetches is fixed by the official checksums.
            # The digest changes once after the download, which only costs a rebuilt cache.
            h.update(f"|official:{CIFAR10.tgz_md5}".encode())
    else:
        folder = _existing_folder(data)
        files, labels, classes = _find_images(folder)
        h.update(f"|v{FOLDER_VERSION}|{classes}".encode())
        for rel, label in zip(files, labels):
            st = (folder / rel).stat()
            h.update(f"|{rel}:{label}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def random_hflip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Flip each image of a (b, 3, H, W) batch horizontally with probability 1/2, using `generator` (deterministic)."""
    flip = torch.rand(len(images), generator=generator, device=generator.device) < 0.5  # (b,)
    flip = flip.to(images.device)[:, None, None, None]
    return torch.where(flip, images.flip(-1), images)


# ----------------------------------------------------------------------------- CIFAR-10

class _LocalCIFAR10(CIFAR10):
    """torchvision's CIFAR10 that trusts a `cifar-10-batches-py` folder already on disk.

    torchvision refuses any file whose md5 differs from the official release. We only use this
    class once the files exist, so copies that were re-packed, truncated to a subset, or written by
    our tests in CIFAR-10's own pickle format load offline; the array shapes and labels are checked
    in `load_cifar10` instead, and the official download (when needed) still goes through the
    checksummed class.
    """

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}  # check_integrity(path, None) only asks that the file exists


def load_cifar10(root: str, image_size: int, split: str) -> ImageDataset:
    """CIFAR-10 from `root/cifar-10-batches-py`, downloaded there first when missing (needs internet)."""
    train = split == "train"
    folder = Path(root).expanduser() / CIFAR10.base_folder
    if folder.is_dir():
        names = [n for n, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} is incomplete: it lacks {', '.join(missing)}")
        try:
            ds = _LocalCIFAR10(str(folder.parent), train=train)
        except Exception as e:  # a damaged pickle: EOFError, UnpicklingError, KeyError...
            raise ValueError(f"{folder}: cannot read the CIFAR-10 files ({type(e).__name__}: {e})") from e
    else:
        try:
            ds = CIFAR10(str(folder.parent), train=train, download=True)
        except Exception as e:  # no internet, proxy, disk full: all end the same way for the user
            raise FileNotFoundError(
                f"CIFAR-10 is not in {folder} and downloading it failed ({type(e).__name__}: {e}). "
                f"Download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
                f"extract it and place the cifar-10-batches-py folder under --data-root "
                f"(here: {folder.parent})."
            ) from e
    data = np.asarray(ds.data)
    labels = torch.as_tensor(ds.targets, dtype=torch.long)
    if data.dtype != np.uint8 or data.shape[1:] != (32, 32, 3) or len(labels) != len(data):
        raise ValueError(f"{folder}: unexpected CIFAR-10 arrays {data.dtype} {data.shape}, {len(labels)} labels")
    if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < len(ds.classes)):
        raise ValueError(f"{folder}: labels outside 0..{len(ds.classes) - 1}")
    images = rearrange(torch.from_numpy(data), "n h w c -> n c h w")  # a view: no second copy
    return ImageDataset(images, labels, list(ds.classes), image_size)


# ----------------------------------------------------------------------------- image folders

def load_folder(path: str, image_size: int, split: str) -> ImageDataset:
    """A folder of images: class subfolders give labels (sorted names), a flat folder is unlabelled.

    Files: .png .jpg .jpeg .webp .bmp (any case), searched recursively inside class folders; hidden
    files and folders are ignored, and so are loose files beside class folders (with a warning).

    Held-out split: a file is in 'test' iff the sha1 of its relative path falls in the lowest
    10% of the hash range, so adding or removing files never moves other files between splits.
    Only tiny folders need an exception: if a split would be empty while there are >= 2 files, the
    file with the lowest hash goes to 'test' (or the highest to 'train'); a single file serves
    both splits, with a warning.

    Each image is decoded once, here, so unreadable files surface before training: they are
    skipped with one warning naming them. Preprocessing: 16-bit greyscale is scaled to 8 bit
    (65535 -> 255); transparency is composited onto white; every mode becomes RGB; the shorter
    side is resized to `image_size` (bicubic, antialiased) and the centre cropped to a square.
    The result is kept in memory as uint8 (n, 3, S, S).
    """
    folder = _existing_folder(path)
    files, labels, classes = _find_images(folder)
    keep = _split_mask(files, split)
    if len(files) == 1:
        warnings.warn(f"{folder} holds a single image: it serves as both the train and the test split")
    files = [f for f, k in zip(files, keep) if k]
    labels = [y for y, k in zip(labels, keep) if k]

    def decode(rel):
        try:
            return _load_image(folder / rel, image_size), None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            return None, f"{rel} ({type(e).__name__}: {e})"

    # PIL releases the GIL while decoding and resizing, so threads give a real speed-up
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(decode, files))
    bad = [err for _, err in results if err is not None]
    if bad:
        shown = "; ".join(bad[:10]) + (f"; ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        warnings.warn(f"skipped {len(bad)} unreadable image file(s) in {folder}: {shown}")
    good = [i for i, (arr, _) in enumerate(results) if arr is not None]
    if not good:
        raise ValueError(f"none of the {len(files)} image file(s) of the {split!r} split of {folder} "
                         f"could be read ({len(bad)} unreadable)")
    images = torch.from_numpy(np.stack([results[i][0] for i in good]))  # (n, s, s, 3)
    images = rearrange(images, "n h w c -> n c h w").contiguous()
    return ImageDataset(images, torch.tensor([labels[i] for i in good], dtype=torch.long), classes,
                        image_size, paths=[files[i] for i in good])


def _existing_folder(path: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"dataset {path!r} is neither 'cifar10', 'shapes' nor an existing folder")
    if not folder.is_dir():
        raise NotADirectoryError(f"dataset {path!r} is a file; expected a folder of images")
    return folder


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()


def _find_images(folder: Path) -> tuple[list[str], list[int], list[str]]:
    """Sorted relative paths (posix), their labels, and class names: ImageFolder's layout, or flat."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    loose = [p.name for p in entries if _is_image(p)]
    per_class = {}
    for d in (p for p in entries if p.is_dir()):
        found = []
        for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
            found += [Path(dirpath, n) for n in filenames if _is_image(Path(dirpath, n))]
        if found:
            per_class[d.name] = sorted(p.relative_to(folder).as_posix() for p in found)
    if per_class:
        if loose:
            warnings.warn(f"{folder} has class subfolders; ignoring {len(loose)} image(s) directly in it "
                          f"(e.g. {loose[0]})")
        classes = sorted(per_class)
        files = [f for c in classes for f in per_class[c]]
        labels = [i for i, c in enumerate(classes) for _ in per_class[c]]
        return files, labels, classes
    if not loose:
        raise FileNotFoundError(f"no image files ({' '.join(IMAGE_EXTENSIONS)}) in {folder}, "
                                f"neither directly nor in class subfolders")
    return loose, [-1] * len(loose), []


def _split_mask(files: list[str], split: str) -> list[bool]:
    """Which files belong to `split`: test iff the path's sha1 falls in the lowest TEST_FRACTION."""
    u = [int.from_bytes(hashlib.sha1(f.encode()).digest()[:8], "big") / 2**64 for f in files]  # in [0, 1)
    test = [x < TEST_FRACTION for x in u]
    if len(files) == 1:
        return [True]
    if not any(test):
        test[min(range(len(u)), key=u.__getitem__)] = True
    if all(test):
        test[max(range(len(u)), key=u.__getitem__)] = False
    return test if split == "test" else [not t for t in test]


def _load_image(path: Path, size: int) -> np.ndarray:
    """Decode one file to uint8 (size, size, 3): RGB, shorter side resized, centre-cropped."""
    with Image.open(path) as im:
        im.draft(None, (size, size))  # JPEG only: decode at a reduced scale that stays >= size
        im.load()
        im = ImageOps.exif_transpose(im)  # camera photos store their rotation in EXIF
        im = _to_rgb(im)
    im = ImageOps.fit(im, (size, size), method=Image.Resampling.BICUBIC)  # crop to square, then resize
    return np.asarray(im, dtype=np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; 16-bit is scaled (PIL's own convert clips it), alpha goes onto white."""
    if im.mode.startswith("I"):  # I;16, I;16B, I (PNG 16-bit greyscale): treat as 0..65535
        a = np.asarray(im).astype(np.int64).clip(0, 65535)
        im = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif im.mode == "F":  # float images: assume 0..1
        a = np.asarray(im, dtype=np.float32)
        im = Image.fromarray((a.clip(0, 1) * 255 + 0.5).astype(np.uint8), "L")
    if (im.mode == "P" and "transparency" in im.info) or im.mode in ("LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("RGB")


# ----------------------------------------------------------------------------- procedural shapes

class ShapesDataset(ImageDataset):
    """Ten classes of coloured shapes on plain backgrounds, generated in memory.

    Each image is one shape, 60-76% of the image wide, near the centre, in one of 6 saturated colours on
    a dark or light grey background. The variation is kept small on purpose: the `tiny` presets of both
    stages can learn it in CPU minutes, so the first run shows recognisable samples. Image i of a split is drawn from a torch.Generator seeded from (split, i) and has label
    i % 10, so any prefix of a split is balanced and reproducible on every machine.
    """

    def __init__(self, image_size: int, split: str = "train", num_images: int | None = None):
        n = SHAPES_SIZES[split] if num_images is None else num_images
        images, labels = make_shapes(n, image_size, split)
        super().__init__(images, labels, SHAPES_CLASSES, image_size)


def make_shapes(n: int, image_size: int, split: str = "train", chunk: int = 512) -> tuple[Tensor, Tensor]:
    """The first n images of a shapes split: uint8 (n, 3, S, S) and int64 labels (n,)."""
    images = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
    labels = torch.arange(n) % len(SHAPES_CLASSES)
    g = torch.Generator()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: intra-op threads cost more than they save (5x on a busy CPU)
    try:
        for start in range(0, n, chunk):
            _make_chunk(images, range(start, min(start + chunk, n)), image_size, split, g)
    finally:
        torch.set_num_threads(threads)
    return images, labels


def _make_chunk(images: Tensor, idx: range, image_size: int, split: str, g: torch.Generator) -> None:
    """Draw images[idx] in place: per-image parameters and masks, then one batched composite."""
    masks, colours = [], []
    for i in idx:
        g.manual_seed(int.from_bytes(hashlib.sha1(f"shapes/{split}/{i}".encode()).digest()[:8], "big") >> 1)
        u = torch.rand(4, generator=g).tolist()  # size, x, y, colour
        masks.append(_shape_mask(i % len(SHAPES_CLASSES), u, image_size))
        colours.append(_colours(u[3]))
    fg, bg = (torch.tensor(c)[:, :, None, None] for c in zip(*colours))  # (b, 3, 1, 1) each
    mask = torch.stack(masks)  # (b, 1, S, S)
    images[idx.start:idx.stop] = ((bg * (1 - mask) + fg * mask) * 255).round().clamp(0, 255).to(torch.uint8)


def _shape_mask(label: int, u: list[float], size: int) -> Tensor:
    """Coverage in [0, 1] (1, S, S) of one shape, drawn at 4x and box-filtered (antialiasing)."""
    m = 4 * size
    h = (0.30 + 0.08 * u[0]) * m  # half extent: the shape spans 60-76% of the image
    cx = m / 2 + (u[1] - 0.5) * 0.16 * m  # centre within 8% of the image's centre
    cy = m / 2 + (u[2] - 0.5) * 0.16 * m
    canvas = Image.new("L", (m, m), 0)
    d = ImageDraw.Draw(canvas)
    name = SHAPES_CLASSES[label]
    if name == "circle":
        d.ellipse((cx - h, cy - h, cx + h, cy + h), fill=255)
    elif name == "square":
        s = 0.85 * h
        d.rectangle((cx - s, cy - s, cx + s, cy + s), fill=255)
    elif name == "triangle":
        d.polygon([(cx, cy - h), (cx + h, cy + 0.8 * h), (cx - h, cy + 0.8 * h)], fill=255)
    elif name == "cross":
        t = 0.3 * h
        d.rectangle((cx - h, cy - t, cx + h, cy + t), fill=255)
        d.rectangle((cx - t, cy - h, cx + t, cy + h), fill=255)
    elif name == "ring":
        r = 0.55 * h
        d.ellipse((cx - h, cy - h, cx + h, cy + h), fill=255)
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=0)
    elif name == "diamond":
        d.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=255)
    elif name == "star":
        pts = [(cx + (h if k % 2 == 0 else 0.42 * h) * math.sin(k * math.pi / 5),
                cy - (h if k % 2 == 0 else 0.42 * h) * math.cos(k * math.pi / 5)) for k in range(10)]
        d.polygon(pts, fill=255)
    elif name == "horizontal bar":
        d.rectangle((cx - h, cy - 0.3 * h, cx + h, cy + 0.3 * h), fill=255)
    elif name == "vertical bar":
        d.rectangle((cx - 0.3 * h, cy - h, cx + 0.3 * h, cy + h), fill=255)
    else:  # two dots on a diagonal
        r, o = 0.4 * h, 0.58 * h
        d.ellipse((cx - o - r, cy - o - r, cx - o + r, cy - o + r), fill=255)
        d.ellipse((cx + o - r, cy + o - r, cx + o + r, cy + o + r), fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)  # area average of the 4x4 sub-pixels
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255)[None]


def _colours(u: float) -> tuple[list[float], list[float]]:
    """A saturated shape colour (one of 6 hues) on a plain grey background on the other side of mid-grey."""
    fg = colorsys.hsv_to_rgb(int(6 * u) / 6, 0.85, 0.95)
    luma = 0.299 * fg[0] + 0.587 * fg[1] + 0.114 * fg[2]
    bg = [0.12] * 3 if luma > 0.45 else [0.88] * 3  # dark behind a bright shape and vice versa
    return list(fg), bg
