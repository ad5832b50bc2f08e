"""Image datasets, for both stages and the FID export: CIFAR-10, a procedural `shapes` set, image folders and
Hugging Face `datasets` (see docs/data.md).

Every dataset serves `(image float32 (3, S, S) in [-1, 1], label int)`, label -1 when unlabelled, and has
`.classes` and `len()`. CIFAR-10 and shapes are small and fixed: they are held in memory as uint8. Folders
and Hugging Face datasets stream: only the list of files (packed into numpy arrays, no per-image Python
objects), the labels and the held-out split are computed up front, from names alone; every image is decoded,
resized and cropped when it is asked for, in the DataLoader's workers. A pre-resized uint8 cache
(`core.image_cache`) can stand in for the decoding.

Augmentation: flips are applied to whole batches by the training loop (`random_hflip` with a per-step
generator). A random-resized crop (`crop="random-resized"`) needs the full image, so it happens at decode
time; the batch sampler then passes `(index, seed, step)` keys instead of plain indices, so that every crop
is a pure function of (seed, step, index) and a resumed run sees the very same crops.
"""

from __future__ import annotations

import colorsys
import hashlib
import math
import os
import time
import warnings
import weakref
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
FOLDER_VERSION = 2  # bump when folder preprocessing changes, so fingerprints (and caches keyed on them) change
PREPROCESS_VERSION = 2  # 1: ImageOps.fit (bicubic); 2: ADM centre crop (BOX halvings, bicubic, crop)
BUILTIN_DATASETS = ("cifar10", "shapes")  # names that win over folders of the same name
HF_PREFIX = "hf:"
SHAPES_VERSION = 2  # bump when the shapes generator changes
SHAPES_CLASSES = [
    "circle", "square", "triangle", "cross", "ring",
    "diamond", "star", "horizontal bar", "vertical bar", "two dots",
]
SHAPES_SIZES = {"train": 10_000, "test": 1_000}
TEST_FRACTION = 0.1  # share of a folder's files held out as its test split
CROPS = ("center", "random-resized")
DEFAULT_CROP_SCALE = (0.8, 1.0)  # area fraction of the square random-resized crop
IMAGE_CACHE_MODES = ("auto", "on", "off")
MAX_SUBSTITUTES = 64  # consecutive unreadable items a lookup walks past before it gives up
PROBES = 32  # items tried at load time (spread over the dataset) to tell a folder of non-images early
COUNTER_SLOTS = 512  # one unreadable-image counter per DataLoader worker (slot 0: the main process)
# content is hashed in full up to this many bytes of image files; larger folders hash a sample (docs/data.md)
CONTENT_HASH_LIMIT = int(float(os.environ.get("MASKGIT_CONTENT_HASH_LIMIT_MB", "256")) * 2**20)
CONTENT_SAMPLE_FILES = 1024  # files hashed in full above the limit (the ones with the lowest path hash)


class ImageDataset(torch.utils.data.Dataset):
    """uint8 images in memory, served one at a time as float32 in [-1, 1].

    Images stored at another resolution than `image_size` (CIFAR-10 asked for at 64 px) are
    resized per item (bicubic, antialiased) so the stored copy stays the compact original.
    """

    def __init__(self, images: Tensor, labels: Tensor, classes: list[str], image_size: int,
                 paths: list[str] | None = None, crop: str = "center",
                 crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE):
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3, images.shape
        assert labels.shape == (len(images),), (labels.shape, images.shape)
        self.images = images  # uint8 (n, 3, h, w)
        self.labels = labels.long()  # (n,), -1 = unlabelled
        self.classes = list(classes)
        self.image_size = image_size
        self.paths = paths  # source files relative to the folder, for folder datasets
        self.crop, self.crop_scale = crop, tuple(crop_scale)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def wants_step_keys(self) -> bool:
        """Whether items depend on (seed, step): the batch sampler then yields `(index, seed, step)` keys."""
        return self.crop == "random-resized"

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> tuple[Tensor, int]:
        i, seed, step = parse_key(key)
        x = self.images[i]  # uint8 (3, h, w)
        if self.crop == "random-resized" and step is not None:
            h, w = x.shape[-2:]
            side, top, left = square_crop_box(w, h, crop_randoms(seed, step, i), self.crop_scale)
            x = x[:, top:top + side, left:left + side]
        x = x.float() / 127.5 - 1  # (3, h, w)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x[None], size=(self.image_size,) * 2, mode="bicubic",
                              antialias=True, align_corners=False)[0].clamp(-1, 1)
        return x, int(self.labels[i])

    def train_item(self, key) -> tuple[Tensor, int]:
        """The item for the training loader: uint8 (3, S, S) when no resizing is needed (`as_float` converts it on
        the device to exactly the values of `self[key]`), else the float item itself."""
        i, _, step = parse_key(key)
        if self.images.shape[-2:] == (self.image_size, self.image_size) and not (
                self.crop == "random-resized" and step is not None):
            return self.images[i], int(self.labels[i])
        return self[key]

    def unreadable_count(self) -> int:
        return 0


def parse_key(key) -> tuple[int, int | None, int | None]:
    """A dataset key: a plain index, or `(index, seed, step)` from a keyed StepBatchSampler."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1]), int(key[2])
    return int(key), None, None


def load_dataset(data: str, image_size: int, split: str = "train", root: str | None = None, *,
                 crop: str = "center", crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
                 verify: bool = False, image_cache: str = "off", cache_dir: str | None = None,
                 progress: bool = True):
    """data is 'cifar10', 'shapes', a path to a folder of images, or 'hf:NAME_OR_PATH[?options]' (docs/data.md);
    split is 'train' or 'test' (held-out).

    `root` is where CIFAR-10 lives (default ./data); the other sources ignore it. The names 'cifar10' and
    'shapes' win over folders of the same name: write ./shapes for such a folder. Options for streamed sources
    (folders, Hugging Face): `crop` ('center': ADM's resize and centre crop; 'random-resized': a square crop of
    an area fraction in `crop_scale`, drawn per (seed, step, index)), `verify` (decode every file now and leave
    out unreadable ones, as all folders were loaded before streaming), `image_cache` ('auto', 'on', 'off': the
    pre-resized uint8 cache of `core.image_cache`, kept in `cache_dir`).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    lo, hi = crop_scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {tuple(crop_scale)}")
    if image_cache not in IMAGE_CACHE_MODES:
        raise ValueError(f"image_cache must be one of {IMAGE_CACHE_MODES}, got {image_cache!r}")
    if data == "cifar10":
        ds = load_cifar10(root or "./data", image_size, split)
        ds.crop, ds.crop_scale = crop, tuple(crop_scale)
        return ds
    if data == "shapes":
        return ShapesDataset(image_size, split, crop=crop, crop_scale=crop_scale)
    if data.startswith(HF_PREFIX):
        from .datasets_hf import load_hf

        ds = load_hf(data, image_size, split, crop=crop, crop_scale=crop_scale)
    else:
        ds = load_folder(data, image_size, split, crop=crop, crop_scale=crop_scale)
    return _prepare_stream(ds, verify=verify, image_cache=image_cache, cache_dir=cache_dir, progress=progress)


def _prepare_stream(ds: StreamingDataset, *, verify: bool, image_cache: str, cache_dir, progress: bool):
    """Verification, the image cache and the early check that a source holds images at all."""
    from .image_cache import attach_image_cache

    cached = attach_image_cache(ds, image_cache, cache_dir, progress=progress)
    if cached is not None:
        return cached  # building the cache decoded (and so checked) every image
    if verify:
        return ds.verified(progress=progress)
    ds.probe()
    return ds


def dataset_fingerprint(data: str, image_size: int, root: str | None = None) -> str:
    """Short hex digest that changes when the dataset's content changes (files added/removed/modified, size, source).

    Folders: names, labels, sizes and mtimes of every file, and the bytes of every file while they total at
    most CONTENT_HASH_LIMIT; above it, inodes of every file and the bytes of a fixed sample of files
    (docs/data.md says what is then trusted)."""
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
    elif data.startswith(HF_PREFIX):
        from .datasets_hf import hf_fingerprint

        h.update(f"|hf|{hf_fingerprint(data)}".encode())
    else:
        folder = _existing_folder(data)
        files, labels, classes = _find_images(folder)
        h.update(f"|v{FOLDER_VERSION}|{classes}".encode())
        h.update(files_digest(folder, files, labels).encode())
    return h.hexdigest()[:16]


def files_digest(folder: Path, files: list[str], labels) -> str:
    """Digest of a list of files: metadata of each, and their content in full or sampled (CONTENT_HASH_LIMIT)."""
    h = hashlib.sha1()
    stats = []
    for rel in files:
        try:
            stats.append(os.stat(os.path.join(os.fsencode(folder), os.fsencode(rel))))
        except OSError:
            stats.append(None)  # vanished since the scan: its absence is part of the digest
    total = sum(st.st_size for st in stats if st is not None)
    full = total <= CONTENT_HASH_LIMIT
    meta = hashlib.sha1(f"{folder}|{full}|{len(files)}".encode())
    for rel, label, st in zip(files, labels, stats):
        meta.update(os.fsencode(rel) + (f":{int(label)}:missing" if st is None else
                                        f":{int(label)}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}").encode())
    memo = meta.hexdigest()
    if memo in _DIGESTS and time.monotonic() - _DIGESTS[memo][0] < DIGEST_MEMO_S:
        return _DIGESTS[memo][1]  # asked again at the same start (run record, each split's cache key)
    h.update(f"|content:{'full' if full else 'sampled'}".encode())
    for rel, label, st in zip(files, labels, stats):
        h.update(b"|" + os.fsencode(rel) + f":{int(label)}:".encode())
        if st is None:
            h.update(b"missing")
        elif full:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        else:  # inode: a replaced file (rsync -a, cp then mv) has a new one even with equal size and mtime
            h.update(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode())
    if full:
        chosen = range(len(files))
    else:
        ranked = sorted(range(len(files)), key=lambda j: _path_hash(os.fsencode(files[j])))
        chosen = sorted(ranked[:CONTENT_SAMPLE_FILES])

    def content(j):
        d = hashlib.blake2b(digest_size=16)
        try:
            with open(os.path.join(os.fsencode(folder), os.fsencode(files[j])), "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    d.update(block)
        except OSError as err:
            d.update(f"unreadable:{err.errno}".encode())
        return d.digest()

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
        for digest in pool.map(content, chosen):
            h.update(digest)
    _DIGESTS[memo] = (time.monotonic(), h.hexdigest())
    return _DIGESTS[memo][1]


_DIGESTS: dict[str, tuple[float, str]] = {}  # recent files_digest results of this process, by file metadata
DIGEST_MEMO_S = 120.0  # how long a digest is reused for unchanged metadata (one start-up asks several times)


def random_hflip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Flip each image of a (b, 3, H, W) batch horizontally with probability 1/2, using `generator` (deterministic)."""
    flip = torch.rand(len(images), generator=generator, device=generator.device) < 0.5  # (b,)
    flip = flip.to(images.device)[:, None, None, None]
    return torch.where(flip, images.flip(-1), images)


# ----------------------------------------------------------------------------- the loader and the command line

def train_loader(dataset, sampler, *, num_workers: int, pin_memory: bool, seed: int,
                 prefetch_factor: int = 2) -> torch.utils.data.DataLoader:
    """The training DataLoader: `sampler` (a StepBatchSampler) gives the order; decoding happens in `num_workers`
    persistent worker processes, `prefetch_factor` batches ahead each, into pinned memory on a GPU. Batches of
    streamed and same-size in-memory datasets are uint8: pass them through `as_float` on the device."""
    sampler.keys = bool(getattr(dataset, "wants_step_keys", False))
    extra = {"prefetch_factor": prefetch_factor, "persistent_workers": True} if num_workers > 0 else {}
    options = dict(batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                   # its own generator: by default each `iter(loader)` draws from the global RNG, which a resumed
                   # run would then use differently (dead-code re-seeding)
                   generator=torch.Generator().manual_seed(seed), **extra)
    if not hasattr(dataset, "train_item"):
        return torch.utils.data.DataLoader(dataset, **options)
    blocks = BatchBlocks(num_workers, prefetch_factor + SPARE_BLOCKS) if num_workers > 0 else None
    return _BlockLoader(TrainItems(dataset, blocks), collate_fn=_collated, **options)


class _BlockLoader(torch.utils.data.DataLoader):
    """A DataLoader over `TrainItems`: yields (images, labels) and tells the workers' `BatchBlocks` which
    batches the training process has received."""

    def __iter__(self):
        blocks = self.dataset.blocks
        for images, labels, block in super().__iter__():
            if blocks is not None:
                blocks.received(images, block)
            yield images, torch.from_numpy(labels)


class TrainItems(torch.utils.data.Dataset):
    """A dataset's items as its training loader passes them: uint8 (3, S, S) where possible (see `as_float`).

    `__getitems__` fills one batch tensor image by image (inside a worker, in a shared-memory block of
    `BatchBlocks`), so no per-item tensors are allocated and stacked: `collate=False` batches pass through
    unchanged, as (images, labels, block). Decoded pixels (S, S, 3) are stored as they come, channels last: the
    batch is a (b, 3, S, S) view of a (b, S, S, 3) buffer, and `as_float` makes it contiguous on the device, in the
    same pass as the float conversion. Transposing in the worker instead cost about 6% of a worker's throughput at
    256 px (timed in one process against bench/data_speed.py's bare decode loop)."""

    def __init__(self, dataset, blocks: BatchBlocks | None = None):
        self.dataset, self.blocks = dataset, blocks

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        x, label = self.dataset.train_item(key)
        return (torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1) if isinstance(x, np.ndarray) else x), label

    def __getitems__(self, keys) -> list:
        labels = np.empty(len(keys), dtype=np.int64)  # numpy: passed by value, where a tensor takes shared memory
        batch = view = None
        block = -1
        for k, key in enumerate(keys):
            x, labels[k] = self.dataset.train_item(key)
            if batch is None:
                pixels = isinstance(x, np.ndarray)  # (S, S, 3) pixels, else a (3, S, S) tensor
                shape, dtype = (len(keys), *x.shape), torch.uint8 if pixels else x.dtype
                if self.blocks is None or torch.utils.data.get_worker_info() is None:
                    store = torch.empty(shape, dtype=dtype)
                else:
                    store, block = self.blocks.take(shape, dtype)
                batch, view = (store.permute(0, 3, 1, 2), store.numpy()) if pixels else (store, None)
            if view is not None:
                view[k] = x
            else:
                batch[k].copy_(x)
        return [batch, labels, block]


SPARE_BLOCKS = 2  # shared-memory batch blocks a worker keeps beyond its prefetched batches (the ones in use)


class BatchBlocks:
    """Shared-memory batch buffers that a loader's workers reuse, and which of them the training process holds.

    A worker's batch travels to the training process in shared memory. Fresh shared memory costs the kernel a
    page fault per 4 KiB page on first write: about 3 ms for a 6.3 MB batch (32 images at 256 px), 9% of a
    worker's decode time (docs/data.md). So each worker keeps `per_worker` blocks and writes a batch into one
    the training process no longer holds, marked by a shared flag: the worker sets it when it fills the block,
    the training process clears it when its copy of the batch's storage is freed (every view of it gone), or at
    once when the batch arrived as a pinned copy. A worker with no free block allocates a fresh one, as
    PyTorch's own collate does, so a training loop that keeps batches never waits and never sees them change."""

    def __init__(self, num_workers: int, per_worker: int):
        self.per_worker = per_worker
        self.flags = torch.zeros(num_workers * per_worker, dtype=torch.int32).share_memory_()
        self._mine: list | None = None  # this worker's blocks (storages), made on first use

    def __getstate__(self):
        return {**self.__dict__, "_mine": None}

    def take(self, shape: tuple, dtype: torch.dtype) -> tuple[Tensor, int]:
        """In a worker: an empty tensor in a free block of this worker, and the block's index (-1: a fresh one)."""
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        first = torch.utils.data.get_worker_info().id * self.per_worker
        if self._mine is None:
            self._mine = [None] * self.per_worker
        flags = self.flags.numpy()
        s = next((s for s in range(self.per_worker) if flags[first + s] == 0), None)
        if s is not None:
            if self._mine[s] is None or self._mine[s].nbytes() < nbytes:
                self._mine[s] = torch.UntypedStorage._new_shared(nbytes)
            storage, block = self._mine[s], first + s
            flags[block] = 1
        else:
            storage, block = torch.UntypedStorage._new_shared(nbytes), -1
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape), block

    def received(self, images: Tensor, block: int) -> None:
        """In the training process, for each batch as it arrives: hand its block back once the batch is gone."""
        if block < 0:
            return
        storage = images.untyped_storage()
        if storage.is_shared():  # the worker's block itself: free once no tensor views it any more
            weakref.finalize(storage, self._release, block)
        else:  # a pinned copy: the block was read already
            self._release(block)

    def _release(self, block: int) -> None:
        self.flags[block] = 0


def _collated(batch):
    return batch


def as_float(images: Tensor) -> Tensor:
    """A batch from `train_loader` as float32 in [-1, 1]: uint8 batches become `x / 127.5 - 1` (the dataset's own
    float values, bit for bit) in contiguous layout, float batches pass through. Call it after moving the batch to
    its device."""
    if images.dtype != torch.uint8:
        return images
    # channels-last batches (decoded pixels) become contiguous here, in the conversion's own pass
    return images.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1)


def add_data_args(parser, *, crop: bool = True) -> None:
    """The data-loading options of the training scripts and export_dataset.py (docs/data.md)."""
    g = parser.add_argument_group("data loading (docs/data.md)")
    if crop:
        g.add_argument("--crop", choices=CROPS, default=None,
                       help="training crop: 'center' (ADM resize + centre crop, the default) or 'random-resized' "
                            "(a square crop per (seed, step, image); held-out images stay centre-cropped)")
        g.add_argument("--crop-scale", type=float, nargs=2, metavar=("MIN", "MAX"), default=None,
                       help=f"area fraction range of --crop random-resized (default {DEFAULT_CROP_SCALE[0]} "
                            f"{DEFAULT_CROP_SCALE[1]})")
    g.add_argument("--verify-images", action="store_true",
                   help="decode every image before training and leave out unreadable ones (else they are "
                        "skipped, counted and replaced by the next image when met)")
    g.add_argument("--image-cache", choices=IMAGE_CACHE_MODES, default="auto",
                   help="pre-resized uint8 cache of folder / Hugging Face images: 'auto' builds it for images "
                        "<= 64 px when it takes <= 8 GiB, 'on' always (centre crop only), 'off' never")
    g.add_argument("--image-cache-dir", default=None,
                   help="where image caches live (default $MASKGIT_IMAGE_CACHE_DIR or "
                        "~/.cache/maskgit-toolkit/image_cache)")


def loader_options(args) -> dict:
    """load_dataset keyword arguments from the options of `add_data_args` (the crop is recorded per run)."""
    return {"verify": bool(getattr(args, "verify_images", False)),
            "image_cache": getattr(args, "image_cache", None) or "auto",
            "cache_dir": getattr(args, "image_cache_dir", None)}


def unreadable_images(accelerator, *datasets) -> dict:
    """{'unreadable_images': n}: items replaced because their file could not be read, summed over processes.

    Counts the given datasets, or every streamed dataset alive in this process (and its DataLoader workers)."""
    datasets = datasets or tuple(_LIVE_STREAMS)
    count = sum(ds.unreadable_count() for ds in datasets if hasattr(ds, "unreadable_count"))
    total = accelerator.reduce(torch.tensor([count], device=accelerator.device, dtype=torch.long), "sum")
    return {"unreadable_images": int(total.item())}


# ----------------------------------------------------------------------------- decoding and cropping

def canonical_data(data: str) -> str:
    """--data as a run records it: built-in names as they are, a folder as an absolute path, and an hf: source with
    its local path (if it is one) made absolute, so that stage 2 and resumes work from any directory."""
    if data in BUILTIN_DATASETS:
        return data
    if data.startswith(HF_PREFIX):
        path, sep, query = data[len(HF_PREFIX):].partition("?")
        local = Path(path).expanduser()
        return HF_PREFIX + (str(local.resolve()) if local.exists() else path) + sep + query
    return str(Path(data).expanduser().resolve())


def crop_randoms(seed: int, step: int, index: int) -> np.ndarray:
    """Three uniforms in [0, 1) for the crop of item `index` at optimizer step `step`: a pure function of them."""
    return np.random.default_rng([seed % 2**63, step, index]).random(3)


def square_crop_box(width: int, height: int, u, scale: tuple[float, float]) -> tuple[int, int, int]:
    """(side, top, left) of a square crop of area fraction scale[0] + u[0] * (scale[1] - scale[0])."""
    fraction = scale[0] + float(u[0]) * (scale[1] - scale[0])
    side = max(1, min(round(math.sqrt(width * height * fraction)), width, height))
    top = min(int(float(u[1]) * (height - side + 1)), height - side)
    left = min(int(float(u[2]) * (width - side + 1)), width - side)
    return side, top, left


def decode_image(source, size: int, *, crop: str = "center", u=None,
                 scale: tuple[float, float] = DEFAULT_CROP_SCALE) -> np.ndarray:
    """Decode one image file (path or file object) to uint8 (size, size, 3).

    RGB via `_to_rgb`; EXIF rotation applied; then ADM's centre crop (`center_crop_arr`), or with
    `crop='random-resized'` and three uniforms `u`, a square crop (`square_crop_box`) resized to size x size.
    JPEGs much larger than needed are decoded at a reduced scale (PIL's draft: 1/2, 1/4, 1/8 in the DCT domain,
    never below what the crop needs)."""
    random_crop = crop == "random-resized" and u is not None
    with Image.open(source) as im:
        if random_crop:
            w, h = im.size
            side, _, _ = square_crop_box(w, h, u, scale)
            im.draft(None, (max(1, math.ceil(w * size / side)), max(1, math.ceil(h * size / side))))
        else:
            im.draft(None, (size, size))  # JPEG only: decode at a reduced scale that stays >= size
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # camera photos store their rotation in EXIF
        im = _to_rgb(im)
    if random_crop:
        side, top, left = square_crop_box(im.width, im.height, u, scale)
        im = im.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side),
                       reducing_gap=3.0)
        return np.asarray(im, dtype=np.uint8)
    return center_crop_arr(im, size)


def center_crop_arr(im: Image.Image, size: int) -> np.ndarray:
    """ADM's preprocessing (guided-diffusion, as in the usual FID reference batches): halve with BOX while the
    shorter side is >= 2 x size, resize the shorter side to `size` with BICUBIC, crop the centre."""
    while min(*im.size) >= 2 * size:
        im = im.resize(tuple(x // 2 for x in im.size), resample=Image.Resampling.BOX)
    scale = size / min(*im.size)
    im = im.resize(tuple(max(size, round(x * scale)) for x in im.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(im, dtype=np.uint8)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]  # a view: whoever stores it copies it once


def to_tensor(arr: np.ndarray) -> Tensor:
    """uint8 (S, S, 3) -> float32 (3, S, S) in [-1, 1] (the values of `x / 127.5 - 1`, computed in place)."""
    arr = np.asarray(arr)
    if not arr.flags.writeable:  # torch warns about read-only arrays even when it only reads them
        arr = arr.copy()
    x = torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)
    return x.div_(127.5).sub_(1)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; 16-bit is scaled (PIL's own convert clips it), alpha goes onto white."""
    if im.mode == "RGB":
        return im  # convert() would copy it
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


# ----------------------------------------------------------------------------- streamed datasets

class PackedPaths:
    """Relative paths as one uint8 array plus int64 offsets: two numpy arrays, however many files."""

    def __init__(self, names: list[bytes]):
        lengths = np.fromiter((len(n) for n in names), dtype=np.int64, count=len(names))
        self.offsets = np.zeros(len(names) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(names), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def raw(self, j: int) -> bytes:
        return self.blob[self.offsets[j]:self.offsets[j + 1]].tobytes()

    def __getitem__(self, j: int) -> str:
        return os.fsdecode(self.raw(j))

    def select(self, rows: np.ndarray) -> PackedPaths:
        return PackedPaths([self.raw(int(j)) for j in rows])


_LIVE_STREAMS: weakref.WeakSet = weakref.WeakSet()  # for unreadable_images()


def display_name(name: str) -> str:
    """A file name for messages: bytes that are not UTF-8 are shown as \\xNN instead of failing to print."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


class UnreadableImage(Exception):
    """One item could not be decoded (its cause is chained)."""


class StreamingDataset(torch.utils.data.Dataset):
    """Images decoded on demand from a source (files of a folder, rows of a Hugging Face dataset).

    Subclasses implement `_open(j)` (a path or file object for item j), `item_name(j)` (for messages) and
    `fingerprint()`. An item whose file cannot be read is replaced by the next readable one (index + 1, + 2,
    ... wrapping around), with a warning and a count in `unreadable_count()`, so batches keep their shape and
    a long run survives files that break or vanish; files added after the start are not seen until a restart.
    """

    source_kind = "stream"

    def __init__(self, labels: np.ndarray, classes: list[str], image_size: int, *, crop: str = "center",
                 crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE, name: str = ""):
        self._labels = np.asarray(labels, dtype=np.int32)
        self.classes = list(classes)
        self.image_size = image_size
        self.crop, self.crop_scale = crop, tuple(float(s) for s in crop_scale)
        self.name = name
        self._cache = None  # an image_cache.ImageCache serving pre-resized pixels (centre crop only)
        self._cache_rows: np.ndarray | None = None  # dataset position -> cache row (readable rows only)
        self._bad = torch.zeros(COUNTER_SLOTS, dtype=torch.long).share_memory_()
        self._warned: set[int] = set()
        _LIVE_STREAMS.add(self)

    # --- what subclasses provide
    def _open(self, j: int):
        raise NotImplementedError

    def item_name(self, j: int) -> str:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def _select(self, rows: np.ndarray) -> StreamingDataset:
        raise NotImplementedError

    # --- the dataset protocol
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> Tensor:
        """int64 (len(self),) labels of the items, in order."""
        labels = self._labels if self._cache_rows is None else self._labels[self._cache_rows]
        return torch.from_numpy(labels.astype(np.int64))

    @property
    def wants_step_keys(self) -> bool:
        return self.crop == "random-resized"

    def __len__(self) -> int:
        return len(self._labels) if self._cache_rows is None else len(self._cache_rows)

    def _source_len(self) -> int:
        return len(self._labels)

    def load_uint8(self, j: int, u=None) -> np.ndarray:
        """Source item j as uint8 (S, S, 3); raises UnreadableImage."""
        try:
            return decode_image(self._open(j), self.image_size, crop=self.crop if u is not None else "center",
                                u=u, scale=self.crop_scale)
        except Exception as err:  # PIL: OSError, SyntaxError, ValueError, DecompressionBombError; gone: OSError
            raise UnreadableImage(f"{self.item_name(j)} ({type(err).__name__}: {err})") from err

    def __getitem__(self, key) -> tuple[Tensor, int]:
        pixels, label = self._item(key)
        return to_tensor(pixels), label

    def train_item(self, key) -> tuple[np.ndarray, int]:
        """The item for the training loader: uint8 (S, S, 3) pixels, a quarter of the bytes of the float item;
        `as_float` turns a batch of them into exactly the values of `self[key]`, on the device."""
        return self._item(key)

    def _item(self, key) -> tuple[np.ndarray, int]:
        """uint8 (S, S, 3) pixels and label of `key`, or of the next readable item."""
        i, seed, step = parse_key(key)
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        for attempt in range(min(n, MAX_SUBSTITUTES)):
            k = (i + attempt) % n
            if self._cache_rows is not None and (self.crop == "center" or step is None):
                row = int(self._cache_rows[k])
                return self._cache.pixels(row), int(self._labels[row])
            u = crop_randoms(seed, step, k) if (self.crop == "random-resized" and step is not None) else None
            j = int(self._cache_rows[k]) if self._cache_rows is not None else k
            try:
                return self.load_uint8(j, u), int(self._labels[j])
            except UnreadableImage as err:
                self._count_bad(j, err)
        raise RuntimeError(f"{self.name}: {min(n, MAX_SUBSTITUTES)} consecutive items from index {i} are unreadable; "
                           f"check the files (or pass --verify-images to find them all before training)")

    def _count_bad(self, j: int, err: Exception) -> None:
        info = torch.utils.data.get_worker_info()
        slot = 0 if info is None else 1 + info.id % (COUNTER_SLOTS - 1)
        self._bad[slot] += 1
        if j not in self._warned and len(self._warned) < 1000:
            self._warned.add(j)
            warnings.warn(f"skipping unreadable image {display_name(str(err))}; serving the next image in its "
                          f"place", stacklevel=2)

    def unreadable_count(self) -> int:
        """Items replaced so far because their file could not be read (all workers of this process)."""
        return int(self._bad.sum())

    # --- up-front checks
    def _decode_all(self, progress: bool) -> list[str | None]:
        """Error message (None when fine) of every source item, decoded in threads."""
        from tqdm.auto import tqdm

        def check(j):
            try:
                self.load_uint8(j)
                return None
            except UnreadableImage as err:
                return str(err)

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            it = pool.map(check, range(self._source_len()))
            return list(tqdm(it, total=self._source_len(), desc=f"verifying {self.name}",
                             disable=not progress or self._source_len() < 1000))

    def verified(self, progress: bool = True) -> StreamingDataset:
        """This dataset without the items that cannot be decoded, named in one warning (--verify-images)."""
        errors = self._decode_all(progress)
        bad = [e for e in errors if e is not None]
        if not bad:
            return self
        shown = "; ".join(display_name(e) for e in bad[:10])
        shown += f"; ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        warnings.warn(f"skipped {len(bad)} unreadable image file(s) in {self.name}: {shown}")
        keep = np.array([e is None for e in errors])
        if not keep.any():
            raise ValueError(f"none of the {len(errors)} image file(s) of {self.name} could be read "
                             f"({len(bad)} unreadable)")
        return self._select(np.flatnonzero(keep))

    def probe(self) -> None:
        """Decode up to PROBES items spread over the dataset until one works: a source of non-images fails now."""
        n = self._source_len()
        tried = sorted(set(np.linspace(0, n - 1, min(n, PROBES)).round().astype(int).tolist()))
        errors = []
        for j in tried:
            try:
                self.load_uint8(j)
                return
            except UnreadableImage as err:
                errors.append(display_name(str(err)))
        raise ValueError(f"none of the {len(tried)} image file(s) tried of {self.name} could be read: "
                         + "; ".join(errors[:5]))

    def with_cache(self, cache, valid: np.ndarray) -> StreamingDataset:
        """Serve centre crops from `cache` (rows = source items); unreadable rows (valid False) are left out."""
        bad = np.flatnonzero(~valid)
        if len(bad):
            names = [display_name(self.item_name(int(j))) for j in bad[:10]]
            shown = "; ".join(names) + (f"; ... and {len(bad) - 10} more" if len(bad) > 10 else "")
            warnings.warn(f"skipped {len(bad)} unreadable image file(s) in {self.name}: {shown}")
        if not valid.any():
            raise ValueError(f"none of the {len(valid)} image file(s) of {self.name} could be read "
                             f"({len(bad)} unreadable)")
        self._cache = cache
        self._cache_rows = np.flatnonzero(valid).astype(np.int64)
        return self

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_warned"] = set()
        return state


class FolderDataset(StreamingDataset):
    """The files of one split of an image folder, decoded on demand (see `load_folder`)."""

    source_kind = "folder"

    def __init__(self, folder: Path, files: PackedPaths, labels: np.ndarray, classes: list[str], image_size: int,
                 split: str, **kwargs):
        super().__init__(labels, classes, image_size, name=f"{folder} ({split})", **kwargs)
        self.folder, self.split = Path(folder), split
        self._root = os.fsencode(self.folder)
        self._files = files

    def _open(self, j: int):
        return os.path.join(self._root, self._files.raw(j))  # a bytes path: names need not be UTF-8

    def item_name(self, j: int) -> str:
        return self._files[j]

    @property
    def paths(self) -> list[str]:
        """Relative paths of the items, in order (built on request: the dataset itself keeps them packed)."""
        rows = range(len(self._files)) if self._cache_rows is None else self._cache_rows
        return [self._files[int(j)] for j in rows]

    def fingerprint(self) -> str:
        names = [self._files[j] for j in range(len(self._files))]
        return f"folder|v{FOLDER_VERSION}|{self.classes}|{files_digest(self.folder, names, self._labels)}"

    def _select(self, rows: np.ndarray) -> FolderDataset:
        return FolderDataset(self.folder, self._files.select(rows), self._labels[rows], self.classes,
                             self.image_size, self.split, crop=self.crop, crop_scale=self.crop_scale)


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

def load_folder(path: str, image_size: int, split: str, **kwargs) -> FolderDataset:
    """A folder of images: class subfolders give labels (sorted names), a flat folder is unlabelled.

    Files: .png .jpg .jpeg .webp .bmp (any case), searched recursively inside class folders, following
    symbolic links but never into a directory already visited (a link loop adds nothing); hidden files and
    folders are ignored, and so are loose files beside class folders (with a warning). A class folder without
    images stays a class (with a warning), so that the indices of the classes after it do not shift.

    Held-out split: a file is in 'test' iff the sha1 of its relative path (its bytes, `os.fsencode`: the UTF-8
    of valid names, and names that are not UTF-8 work too) falls in the lowest 10% of the hash range, so
    adding or removing files never moves other files between splits. Only tiny folders need an exception:
    if a split would be empty while there are >= 2 files, the file with the lowest hash goes to 'test' (or
    the highest to 'train'); a single file serves both splits, with a warning.

    Only names are read here (no file is opened): decoding happens per item (`decode_image`).
    """
    folder = _existing_folder(path)
    files, labels, classes = _find_images(folder)
    keep = _split_mask(files, split)
    if len(files) == 1:
        warnings.warn(f"{folder} holds a single image: it serves as both the train and the test split")
    rows = np.flatnonzero(keep)
    packed = PackedPaths([os.fsencode(files[j]) for j in rows])
    label_array = np.asarray(labels, dtype=np.int32)[rows] if len(labels) else np.zeros(0, np.int32)
    del files, labels
    return FolderDataset(folder, packed, label_array, classes, image_size, split, **kwargs)


def _existing_folder(path: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"dataset {path!r} is neither 'cifar10', 'shapes', 'hf:...' nor an existing folder")
    if not folder.is_dir():
        raise NotADirectoryError(f"dataset {path!r} is a file; expected a folder of images")
    return folder


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _entries(path: str) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()  # follows symbolic links; a dangling link is not a file
    except OSError:
        return False


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _walk_images(top: str, prefix: str, visited: set, repeated: list) -> list[str]:
    """Relative paths (prefix/...) of the image files under `top`, following links, each directory once."""
    found, stack = [], [(top, prefix)]
    while stack:
        path, rel = stack.pop()
        try:
            st = os.stat(path)
            entries = _entries(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in visited:
            repeated.append(rel)
            continue
        visited.add((st.st_dev, st.st_ino))
        for e in entries:
            if _is_dir(e):
                stack.append((e.path, f"{rel}/{e.name}"))
            elif _is_image_name(e.name) and _is_file(e):
                found.append(f"{rel}/{e.name}")
    return found


def _find_images(folder: Path) -> tuple[list[str], list[int], list[str]]:
    """Sorted relative paths (posix), their labels, and class names: ImageFolder's layout, or flat."""
    root = str(folder)
    entries = _entries(root)
    loose = [e.name for e in entries if _is_image_name(e.name) and _is_file(e)]
    class_dirs = [e for e in entries if _is_dir(e)]
    visited = {(os.stat(root).st_dev, os.stat(root).st_ino)}
    repeated: list[str] = []
    per_class = {e.name: sorted(_walk_images(e.path, e.name, visited, repeated)) for e in class_dirs}
    if repeated:
        warnings.warn(f"{folder}: {len(repeated)} folder(s) reached again through symbolic links were not read "
                      f"twice (e.g. {display_name(repeated[0])})")
    if any(per_class.values()):
        if loose:
            warnings.warn(f"{folder} has class subfolders; ignoring {len(loose)} image(s) directly in it "
                          f"(e.g. {display_name(loose[0])})")
        empty = [c for c, f in per_class.items() if not f]
        if empty:
            warnings.warn(f"{folder}: class folder(s) {', '.join(map(display_name, empty))} hold no images; they "
                          f"stay classes (without training images) so that the other classes keep their indices. "
                          f"Remove such a folder to drop its class")
        classes = sorted(per_class)
        files = [f for c in classes for f in per_class[c]]
        labels = [i for i, c in enumerate(classes) for _ in per_class[c]]
        return files, labels, classes
    if not loose:
        raise FileNotFoundError(f"no image files ({' '.join(IMAGE_EXTENSIONS)}) in {folder}, "
                                f"neither directly nor in class subfolders")
    return loose, [-1] * len(loose), []


def _path_hash(name: bytes) -> float:
    """Position of a name in [0, 1): the first 8 bytes of its sha1."""
    return int.from_bytes(hashlib.sha1(name).digest()[:8], "big") / 2**64


def split_mask_from_hashes(u: np.ndarray, split: str) -> np.ndarray:
    """Which items belong to `split`, from their hash positions u in [0, 1): test iff u < TEST_FRACTION."""
    test = u < TEST_FRACTION
    if len(u) == 1:
        return np.ones(1, dtype=bool)
    if not test.any():
        test[int(np.argmin(u))] = True
    if test.all():
        test[int(np.argmax(u))] = False
    return test if split == "test" else ~test


def _split_mask(files: list[str], split: str) -> np.ndarray:
    """Which files belong to `split`: test iff the sha1 of the path's bytes falls in the lowest TEST_FRACTION."""
    u = np.fromiter((_path_hash(os.fsencode(f)) for f in files), dtype=np.float64, count=len(files))
    return split_mask_from_hashes(u, split)


def _load_image(path: Path, size: int) -> np.ndarray:
    """Decode one file to uint8 (size, size, 3) with the centre crop (kept for callers of the old name)."""
    return decode_image(path, size)


# ----------------------------------------------------------------------------- procedural shapes

class ShapesDataset(ImageDataset):
    """Ten classes of coloured shapes on plain backgrounds, generated in memory.

    Each image is one shape, 60-76% of the image wide, near the centre, in one of 6 saturated colours on
    a dark or light grey background. The variation is kept small on purpose: the `tiny` presets of both
    stages can learn it in CPU minutes, so the first run shows recognisable samples. Image i of a split is drawn
    from a torch.Generator seeded from (split, i) and has label i % 10, so any prefix of a split is balanced and
    reproducible on every machine.
    """

    def __init__(self, image_size: int, split: str = "train", num_images: int | None = None, **kwargs):
        n = SHAPES_SIZES[split] if num_images is None else num_images
        images, labels = make_shapes(n, image_size, split)
        super().__init__(images, labels, SHAPES_CLASSES, image_size, **kwargs)


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
