"""The pre-resized image cache: every image of a streamed split, centre-cropped to S x S, in one uint8 file.

    CACHE_DIR/KEY/images.u8     uint8 (N, S, S, 3), memory-mapped read-only by every loader process/worker
    CACHE_DIR/KEY/done-sK/*.npy one marker per finished shard of K images (which of them were readable)
    CACHE_DIR/KEY/valid.npy     all markers combined: the cache is complete (written last, atomically)
    CACHE_DIR/KEY/meta.json     what the cache holds, for people

KEY digests the split's content fingerprint (file names, labels, sizes, mtimes and the bytes of the files, or
a sample of them for huge folders: `core.data.files_digest`), the image size, the preprocessing version and
this file's version, so a cache is never read for other data or other pixels. The cache is built once, by all
processes of the machine in parallel (shard s by local process s % world, see `core.sharded`), resumes when a
build stopped half-way, and is preallocated first, so a disk that cannot hold it is reported before any work.
Without a cache (or when it cannot be written) the dataset streams from the files, with the same pixels.

Modes: 'off'; 'on' (centre crops only; an error if it cannot be written); 'auto' (the default of the scripts):
'on' for images of at most AUTO_MAX_SIZE px whose cache takes at most AUTO_MAX_BYTES, else 'off' (writing
the cache then costs a warning, not the run).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import sharded
from .data import PREPROCESS_VERSION, StreamingDataset, UnreadableImage

CACHE_VERSION = 1
AUTO_MAX_SIZE = 64  # 'auto' caches images of at most this many pixels a side...
AUTO_MAX_BYTES = 8 * 2**30  # ...when the cache takes at most this much disk
SHARD_SIZE = None  # images per shard (the unit of resuming and of the work split); None: sharded.auto_shard_size
CHUNK = 64  # images decoded and written together


def default_cache_dir() -> Path:
    """$MASKGIT_IMAGE_CACHE_DIR, else $XDG_CACHE_HOME/maskgit-toolkit/image_cache (~/.cache/...)."""
    if os.environ.get("MASKGIT_IMAGE_CACHE_DIR"):
        return Path(os.environ["MASKGIT_IMAGE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "maskgit-toolkit" / "image_cache"


class ImageCache:
    """Read side of a complete cache: rows of a uint8 (N, S, S, 3) memory map, opened lazily in each process."""

    def __init__(self, path: Path, num_items: int, image_size: int):
        self.path, self.num_items, self.image_size = Path(path), num_items, image_size
        self._array = None

    def pixels(self, row: int) -> np.ndarray:
        if self._array is None:
            s = self.image_size
            # copy-on-write: read-only in effect (nothing writes), but a writable array for torch.from_numpy
            self._array = np.memmap(self.path, dtype=np.uint8, mode="c", shape=(self.num_items, s, s, 3))
        return self._array[row]

    def __getstate__(self):  # DataLoader workers (spawn/forkserver) map the file themselves
        return {**self.__dict__, "_array": None}


def cache_key(ds: StreamingDataset) -> str:
    meta = {"version": CACHE_VERSION, "preprocess": PREPROCESS_VERSION, "size": ds.image_size,
            "items": ds._source_len(), "source": ds.fingerprint()}
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]


def wants_cache(ds: StreamingDataset, mode: str) -> bool:
    if mode == "off":
        return False
    if ds.crop != "center":
        if mode == "on":
            warnings.warn("--image-cache on: the cache holds centre crops, so --crop random-resized streams "
                          "from the files instead")
        return False
    nbytes = ds._source_len() * ds.image_size**2 * 3
    return mode == "on" or (ds.image_size <= AUTO_MAX_SIZE and nbytes <= AUTO_MAX_BYTES)


def attach_image_cache(ds: StreamingDataset, mode: str, cache_dir=None, *, progress: bool = True):
    """`ds` served from its image cache (built first when needed), or None when no cache applies or can be written."""
    if not wants_cache(ds, mode):
        return None
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = folder / cache_key(ds)
    try:
        valid = build_or_open(folder, ds, progress=progress)
    except OSError as err:  # CacheWriteError: disk full, read-only, quota
        message = (f"the image cache {folder} could not be written ({err}); nothing half-written is used. "
                   f"Free disk space, pass --image-cache-dir on a larger disk, or --image-cache off")
        if mode == "on":
            raise sharded.CacheWriteError(getattr(err, "errno", None), message) from err
        warnings.warn(message + "; streaming from the image files instead")
        return None
    return ds.with_cache(ImageCache(folder / "images.u8", ds._source_len(), ds.image_size), valid)


def build_or_open(folder: Path, ds: StreamingDataset, *, progress: bool = True) -> np.ndarray:
    """Which rows of the complete cache in `folder` are readable images, after building what is missing."""
    n, s = ds._source_len(), ds.image_size
    row_bytes = s * s * 3
    data, valid_path, failed = folder / "images.u8", folder / "valid.npy", folder / "failed"
    if valid_path.is_file() and data.is_file() and data.stat().st_size == n * row_bytes:
        try:
            valid = np.load(valid_path)
            if valid.shape == (n,) and valid.dtype == bool:
                return valid
        except (OSError, ValueError):
            pass
    started = time.time()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"source": ds.name, "items": n, "image_size": s, "dtype": "uint8", "shape": [n, s, s, 3],
                "preprocess_version": PREPROCESS_VERSION, "cache_version": CACHE_VERSION}
        if not (folder / "meta.json").is_file():
            tmp = folder / f".meta.json.tmp{os.getpid()}"
            tmp.write_text(json.dumps(meta, indent=2) + "\n")
            os.replace(tmp, folder / "meta.json")
        sharded.preallocate(data, n * row_bytes)
    except OSError as err:
        _note_failure(failed)
        raise sharded.CacheWriteError(getattr(err, "errno", None), str(err)) from err

    build = sharded.ShardedBuild(folder, n, SHARD_SIZE or sharded.auto_shard_size(n))
    rank, world = sharded.local_rank_world()
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc=f"image cache {ds.name} ({s}px)", unit="img", disable=not (progress and rank == 0))
    bar.update(sum(len(build.rows(k)) for k in range(build.num_shards) if build.is_done(k)))
    threads = max(1, min(8, (os.cpu_count() or 1) // world))

    def decode(j: int):
        try:
            return ds.load_uint8(j)
        except UnreadableImage:
            return None

    def build_shards(shards: list[int]) -> None:
        fd = os.open(data, os.O_RDWR)
        try:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                for shard in shards:
                    if build.is_done(shard):
                        continue
                    rows = build.rows(shard)
                    valid = np.zeros(len(rows), dtype=bool)
                    for start in range(rows.start, rows.stop, CHUNK):
                        chunk = range(start, min(start + CHUNK, rows.stop))
                        buffer = np.zeros((len(chunk), s, s, 3), dtype=np.uint8)
                        for k, arr in enumerate(pool.map(decode, chunk)):
                            if arr is not None:
                                buffer[k] = arr
                                valid[start - rows.start + k] = True
                        sharded.write_at(fd, buffer, start * row_bytes)
                        bar.update(len(chunk))
                    os.fsync(fd)  # the pixels are on disk before the marker says so
                    build.mark_done(shard, valid)
        except OSError as err:
            _note_failure(failed)
            raise sharded.CacheWriteError(getattr(err, "errno", None), f"writing {data}: {err}") from err
        finally:
            os.close(fd)

    def finished() -> bool:
        if failed.is_file() and failed.stat().st_mtime > started:  # failed during this build, not an earlier one
            raise sharded.CacheWriteError(None, f"another process could not write {data} (see its error)")
        return valid_path.is_file()

    try:
        build.run(build_shards, rank, world, finished=finished,
                  on_progress=lambda k: bar.update(min(k * build.shard_size, max(0, n - bar.n))))
    finally:
        bar.close()
    if valid_path.is_file():
        return np.load(valid_path)
    valid = np.concatenate([build.read_marker(k) for k in range(build.num_shards)])
    sharded.atomic_save_npy(valid_path, valid)
    sharded.fsync_dir(folder)
    failed.unlink(missing_ok=True)
    return valid


def _note_failure(path: Path) -> None:
    """Tell the other processes building the same cache to stop waiting (best effort on a full disk)."""
    try:
        path.touch()
    except OSError:
        pass
