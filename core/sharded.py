"""Files that several processes fill in parallel, shard by shard, and that nobody reads before they are whole.

Both on-disk caches (the pre-resized image cache, `core.image_cache`, and stage 2's token cache,
`maskgit.token_cache`) are one preallocated file that every process writes its own shards of, at fixed
offsets, with a marker file per finished shard:

    DIR/data              the array file, preallocated to its final size (ENOSPC surfaces before any work)
    DIR/done-sK/SSSSS.npy shard S (of K items) is on disk: written and fsynced before the marker appears (atomically)

A process builds the shards `s` with `s % world == rank` that have no marker, then polls (no collective, so
no process-group timeout can fire while another process works) until every marker exists. A process that
waits for more than `stall_s` without any new marker builds the missing shards itself (duplicated work is
harmless: the bytes are the same). A build that stops half-way (killed, out of disk) leaves only whole shards
behind markers; the next build redoes the others.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

POLL_S = 0.2  # how often a waiting process looks for the other processes' markers
STALL_S = 600.0  # no new marker for this long: the waiting process builds what is missing itself


class CacheWriteError(OSError):
    """Writing a cache failed (disk full, read-only folder, ...); nothing half-written is ever read back."""


def local_rank_world() -> tuple[int, int]:
    """This process's place among the processes of this machine (torchrun / accelerate launch set these)."""
    rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return (rank, world) if 0 <= rank < world else (0, 1)


def preallocate(path: Path, size: int, header: bytes = b"") -> None:
    """Create `path` (if absent) at exactly `size` bytes with `header` at offset 0; reserve the blocks.

    Several processes may call this at once: nobody truncates, every call writes the same header. Raises
    CacheWriteError when the disk cannot hold the file (posix_fallocate reports ENOSPC up front)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise CacheWriteError(err.errno, f"cannot create {path}: {err.strerror}") from err
    try:
        current = os.fstat(fd).st_size
        if current not in (0, size):
            os.ftruncate(fd, 0)  # a file of another size (an older layout): start it afresh
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise
                os.ftruncate(fd, size)  # filesystems without fallocate (EOPNOTSUPP): a sparse file
        else:
            os.ftruncate(fd, size)
        if header:
            write_at(fd, header, 0)
    except OSError as err:
        raise CacheWriteError(err.errno, f"cannot write {path} ({size / 2**30:.2f} GiB): {err.strerror}") from err
    finally:
        os.close(fd)


def write_at(fd: int, data, offset: int) -> None:
    """pwrite all of `data` at `offset` (a short write is continued; errors such as ENOSPC propagate)."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """np.save that leaves either no file or the whole file (temporary name, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise CacheWriteError(err.errno, f"cannot write {path}: {err.strerror}") from err
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def auto_shard_size(num_items: int) -> int:
    """Images per shard: about 64 shards (so that several processes share even a small dataset), 64..4096 each.

    A function of the item count alone, so a resumed build finds the same shards whatever the process count."""
    return max(64, min(4096, -(-num_items // 64)))


class ShardedBuild:
    """The marker bookkeeping of one sharded file: which shards exist, who builds which, waiting for the rest."""

    def __init__(self, folder: Path, num_items: int, shard_size: int):
        self.folder = Path(folder)
        self.num_items, self.shard_size = num_items, shard_size
        self.num_shards = max(1, -(-num_items // shard_size))
        self.done_dir = self.folder / f"done-s{shard_size}"

    def rows(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_items))

    def marker(self, shard: int) -> Path:
        return self.done_dir / f"{shard:05d}.npy"

    def is_done(self, shard: int) -> bool:
        return self.marker(shard).is_file()

    def missing(self) -> list[int]:
        if not self.done_dir.is_dir():
            return list(range(self.num_shards))
        present = {p.name for p in self.done_dir.iterdir()}
        return [s for s in range(self.num_shards) if self.marker(s).name not in present]

    def mark_done(self, shard: int, payload: np.ndarray) -> None:
        """The shard's data is on disk (fsynced): publish its marker (a small array, e.g. which rows are valid)."""
        self.done_dir.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(self.marker(shard), payload)

    def read_marker(self, shard: int) -> np.ndarray:
        return np.load(self.marker(shard))

    def run(self, build_shards: Callable[[list[int]], None], rank: int, world: int, *,
            on_progress: Callable[[int], None] | None = None, stall_s: float = STALL_S,
            finished: Callable[[], bool] | None = None) -> None:
        """Build this process's missing shards, then wait (polling) until all exist; steal them after a stall.

        `build_shards(shards)` builds and marks the given shards. `on_progress(k)` is told about k shards
        another process finished. `finished()` may report that someone already completed the whole file."""
        mine = [s for s in self.missing() if s % world == rank]
        if mine:
            build_shards(mine)
        seen = set(range(self.num_shards)) - set(self.missing())
        last_change = time.monotonic()
        while True:
            if finished is not None and finished():
                return
            missing = self.missing()
            if not missing:
                return
            now_done = set(range(self.num_shards)) - set(missing)
            if len(now_done) > len(seen):
                if on_progress is not None:
                    on_progress(len(now_done - seen))
                seen, last_change = now_done, time.monotonic()
            elif time.monotonic() - last_change > stall_s:
                build_shards(missing)  # another process died or hangs: do its part
                last_change = time.monotonic()
                continue
            time.sleep(POLL_S)
