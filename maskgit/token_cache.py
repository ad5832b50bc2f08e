"""Stage 2 trains on code grids, not pixels: the dataset is encoded once with the tokenizer and cached on disk.

    CACHE_DIR/codes-KEY.safetensors     labels int64 (N,), codes (N, V, h, w) in the smallest integer type that
                                        holds the codebook (uint8 / int16 / int32), metadata: class names, views
    CACHE_DIR/codes-KEY.parts/          while encoding: the file being filled, one marker per finished shard

KEY digests everything the codes depend on: the tokenizer's weights and config, the dataset's content
fingerprint (`core.data.dataset_fingerprint`: names, sizes, mtimes and file bytes, see docs/data.md), the split
and the views. Views (`--token-views`): 'flip' (as given and mirrored: horizontal flips cost nothing at
training time; the default), 'none', or 'tencrop' (LlamaGen's: the image centre-cropped at 1.1 x the size,
then its four corners, centre and their mirror images). The held-out split always has one view, as given.

Every process encodes its own shards (about 64 of 64..4096 images; shard s by process s % world) straight into
their place in the final file, which is preallocated with its safetensors header; a marker appears once a shard
is on disk, so an interrupted encode resumes at the first missing shard. Nobody waits at a barrier: a process
that is done polls the markers until all exist, then the file is renamed to its final name (atomically: a cache
file is whole or absent). Training memory-maps the codes and widens them to int64 one batch at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from core import sharded
from core.data import dataset_fingerprint
from core.images import images_per_batch

CACHE_VERSION = 2  # 1: int16/int32 safetensors built by the main process; 2: sharded, memory-mapped
TOKEN_VIEWS = ("flip", "none", "tencrop")
TENCROP_RANGE = 1.1  # tencrop: the image is centre-cropped at this multiple of the size, then cut in ten
SHARD_SIZE = None  # images per shard; None: core.sharded.auto_shard_size (about 64 shards of 64..4096)
FORMAT = "maskgit-token-cache/2"
_ST_DTYPES = {"U8": np.uint8, "I16": np.int16, "I32": np.int32, "I64": np.int64}


def code_dtype(codebook_size: int) -> str:
    """safetensors dtype name of the smallest integer type that holds codes 0..codebook_size-1."""
    if codebook_size <= 256:
        return "U8"
    if codebook_size <= 2**15:
        return "I16"
    return "I32"


def split_views(views: str, split: str) -> str:
    """The views a split is encoded with: the training split's choice; the held-out split as given only."""
    if views not in TOKEN_VIEWS:
        raise ValueError(f"token views must be one of {TOKEN_VIEWS}, got {views!r}")
    return views if split == "train" else "none"


def num_views(views: str) -> int:
    return {"flip": 2, "none": 1, "tencrop": 10}[views]


def encode_size(views: str, image_size: int) -> int:
    """Resolution the images are loaded at: tencrop cuts its crops from a 1.1x larger centre crop."""
    return int(image_size * TENCROP_RANGE) if views == "tencrop" else image_size


def _weights_digest(vq_run: Path) -> bytes:
    digest = hashlib.sha256((vq_run / "config.json").read_bytes())
    with open(vq_run / "model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.digest()


def tokenizer_digest(data: dict) -> bytes:
    """What identifies the tokenizer of a stage-2 data description: our stage-1 folder's config and weights, or a
    published tokenizer's source record (kind, path or Hub repo + revision + commit, sha256 of every weight file,
    pixel range)."""
    if data.get("vq_run"):
        return _weights_digest(Path(data["vq_run"]))
    return hashlib.sha256(json.dumps(data["tokenizer"], sort_keys=True).encode()).digest()


def cache_key(tokenizer, data: str, image_size: int, split: str, root: str | None, views="flip") -> str:
    """Digest of everything the cached codes depend on: `tokenizer` is our stage-1 run folder or the bytes of
    `tokenizer_digest` (`views` may also be the old flips bool)."""
    if isinstance(views, bool):
        views = "flip" if views else "none"
    digest = hashlib.sha256(tokenizer if isinstance(tokenizer, bytes) else _weights_digest(Path(tokenizer)))
    meta = {"version": CACHE_VERSION, "data": dataset_fingerprint(data, encode_size(views, image_size), root),
            "split": split, "views": views}
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()[:20]


def grid_for(vq, image_size: int) -> tuple[int, int]:
    """The code grid of square `image_size` images: a Tokenizer's own answer, or a VQVAE's downsampling factor."""
    if hasattr(vq, "grid_for"):
        return tuple(vq.grid_for(image_size))
    factor = vq.cfg.downsample if hasattr(vq, "cfg") else vq.downsample
    return image_size // factor, image_size // factor


def make_views(images: torch.Tensor, views: str, size: int) -> list[torch.Tensor]:
    """The views of a batch (b, 3, H, W): as given (+ mirrored), or the ten crops of `size` (torchvision's order)."""
    if views == "flip":
        return [images, images.flip(-1)]
    if views == "none":
        return [images]
    from torchvision.transforms.functional import ten_crop

    return list(ten_crop(images, [size, size]))


# ----------------------------------------------------------------------------- the file

def header_bytes(n: int, v: int, h: int, w: int, dtype: str, metadata: dict) -> bytes:
    """A safetensors header for labels I64 (n,) then codes (n, v, h, w): the data of every shard has a fixed place."""
    itemsize = np.dtype(_ST_DTYPES[dtype]).itemsize
    labels_end = 8 * n
    codes_end = labels_end + n * v * h * w * itemsize
    header = {"labels": {"dtype": "I64", "shape": [n], "data_offsets": [0, labels_end]},
              "codes": {"dtype": dtype, "shape": [n, v, h, w], "data_offsets": [labels_end, codes_end]},
              "__metadata__": {k: str(val) for k, val in metadata.items()}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def open_codes(path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(codes (N, V, h, w) in their stored integer type, labels int64 (N,), class names), memory-mapped."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > size:
            raise ValueError(f"{path}: header length {length} exceeds the file")
        header = json.loads(fh.read(length))
    start = 8 + length
    tensors = {}
    for name in ("labels", "codes"):
        info = header[name]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        first, last = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        if last - first != int(np.prod(shape)) * dtype.itemsize or start + last > size:
            raise ValueError(f"{path}: tensor {name} does not fit the file (truncated?)")
        # copy-on-write: pages are shared with the page cache; torch wants a writable array
        array = np.memmap(path, dtype=dtype, mode="c", offset=start + first, shape=shape)
        tensors[name] = torch.from_numpy(array)
    classes = json.loads(header["__metadata__"]["classes"])
    return tensors["codes"], tensors["labels"], classes


encode_batch_size = images_per_batch  # images per encoder batch (core.images)


def load_or_encode(cache_dir, key: str, make_dataset, vq, *, views: str, image_size: int, accelerator=None,
                   num_workers: int = 0, batch_size: int | None = None, progress: bool = True):
    """Cached (codes, labels, class names) for `key`; every process encodes its shards when the cache is absent.

    `make_dataset()` loads the split (only called when something is to be encoded). Without `accelerator`
    this process does all the work on the CPU."""
    cache_dir = Path(cache_dir)
    final = cache_dir / f"codes-{key}.safetensors"
    if final.is_file():
        try:
            return open_codes(final)
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
            print(f"token cache {final} is unreadable ({err}); rebuilding it")
            final.unlink(missing_ok=True)

    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    main = rank == 0
    batch_size = batch_size or encode_batch_size(image_size)
    dataset = make_dataset()
    n, v = len(dataset), num_views(views)
    h, w = grid_for(vq, image_size)
    dtype = code_dtype(vq.codebook_size)
    np_dtype = _ST_DTYPES[dtype]
    header = header_bytes(n, v, h, w, dtype, {"classes": json.dumps(dataset.classes), "views": views,
                                              "format": FORMAT})
    shard_size = SHARD_SIZE or sharded.auto_shard_size(n)
    parts = cache_dir / f"codes-{key}.parts" / f"n{n}-v{v}"
    partial = parts / "codes.safetensors.partial"
    cache_dir.mkdir(parents=True, exist_ok=True)
    if final.is_file():  # another process finished while this one loaded the dataset
        return open_codes(final)
    parts.mkdir(parents=True, exist_ok=True)
    sharded.preallocate(partial, len(header) + 8 * n + n * v * h * w * np.dtype(np_dtype).itemsize, header)
    build = sharded.ShardedBuild(parts, n, shard_size)
    labels_at = len(header)
    codes_at = labels_at + 8 * n
    row_bytes = v * h * w * np.dtype(np_dtype).itemsize

    bar = tqdm(total=n, desc="encoding dataset", unit="img", disable=not (progress and main))
    bar.update(sum(len(build.rows(s)) for s in range(build.num_shards) if build.is_done(s)))

    @torch.no_grad()
    def build_shards(shards: list[int]) -> None:
        batches, owner = [], []
        for shard in shards:
            rows = build.rows(shard)
            for start in range(rows.start, rows.stop, batch_size):
                batches.append(list(range(start, min(start + batch_size, rows.stop))))
                owner.append(shard)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
        fd = os.open(partial, os.O_RDWR)
        try:
            codes_buf, labels_buf = [], []
            for k, (images, labels) in enumerate(loader):
                images = images.to(device)
                codes = torch.stack([vq.encode(x) for x in make_views(images, views, image_size)], dim=1)
                codes_buf.append(codes.cpu().numpy().astype(np_dtype))  # (b, V, h, w)
                labels_buf.append(torch.as_tensor(labels).numpy().astype(np.int64))
                bar.update(len(images))
                if k + 1 == len(batches) or owner[k + 1] != owner[k]:  # the shard is complete
                    rows = build.rows(owner[k])
                    sharded.write_at(fd, np.ascontiguousarray(np.concatenate(labels_buf)), labels_at + 8 * rows.start)
                    sharded.write_at(fd, np.ascontiguousarray(np.concatenate(codes_buf)),
                                     codes_at + rows.start * row_bytes)
                    os.fsync(fd)
                    build.mark_done(owner[k], np.ones(1, dtype=bool))
                    codes_buf, labels_buf = [], []
                    if final.is_file():
                        return
        finally:
            os.close(fd)

    def on_progress(shards: int) -> None:
        bar.update(min(shards * shard_size, max(0, n - bar.n)))

    try:
        build.run(build_shards, rank, world, on_progress=on_progress, finished=final.is_file)
    finally:
        bar.close()
    if not final.is_file():
        try:
            fd = os.open(partial, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(partial, final)  # whole or absent: nothing half-written is ever read back
            sharded.fsync_dir(cache_dir)
        except FileNotFoundError:
            if not final.is_file():  # another process renamed it; anything else is an error
                raise
    shutil.rmtree(cache_dir / f"codes-{key}.parts", ignore_errors=True)
    return open_codes(final)


def encoded_splits(accelerator, vq, data: dict, cache_dir, *, views: str = "flip", num_workers: int = 0,
                   loader_options: dict | None = None):
    """(train codes (N, V, h, w), train labels, held-out codes (M, 1, h, w), held-out labels, class names).

    Codes stay in their stored integer type and memory-mapped; `maskgit.train.batch` widens each batch."""
    from core.data import load_dataset

    out, classes = [], []
    for split in ("train", "test"):
        split_view = split_views(views, split)
        size = encode_size(split_view, data["image_size"])

        def make(split=split, size=size):
            return load_dataset(data["data"], size, split, root=data["data_root"], progress=accelerator.is_main_process,
                                **(loader_options or {}))

        key = cache_key(tokenizer_digest(data), data["data"], data["image_size"], split, data["data_root"], split_view)
        codes, labels, classes = load_or_encode(cache_dir, key, make, vq, views=split_view,
                                                image_size=data["image_size"], accelerator=accelerator,
                                                num_workers=num_workers, progress=accelerator.is_main_process)
        out += [codes, labels]
    return (*out, classes)
