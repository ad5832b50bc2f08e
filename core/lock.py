"""One run per folder: `FOLDER/.lock`, taken atomically by the main process, released on exit.

The lock file is JSON: {"host", "pid", "started" (ISO time), "command", "token"}. It is created with
O_CREAT | O_EXCL, so of two processes that try at once exactly one gets it. A lock whose holder is gone
(same host, pid no longer running) is stale: it is taken over with a warning. A lock from another host is
never taken over, since this host cannot tell whether that process still runs; the error says how to remove it.

Under `accelerate launch` only the main process (RANK 0) locks: the others go on to `Accelerator()`, whose
set-up waits for the main process, and are ended by the launcher if the main process fails to get the lock.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
import uuid
import warnings
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

LOCK_NAME = ".lock"
_HELD: set[str] = set()  # tokens of the locks this process holds


class FolderLockedError(RuntimeError):
    """Another run holds the folder."""


def is_launch_main_process() -> bool:
    """Whether this is the main process of a launch (or a plain `python` run), before any Accelerator exists."""
    return int(os.environ.get("RANK", "0")) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')!r}, started {holder.get('started')}: "
            f"{holder.get('command')}")


class FolderLock:
    """`FOLDER/.lock` for the lifetime of a run; a context manager (release is idempotent)."""

    def __init__(self, folder, command: list[str] | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = shlex.join(command if command is not None else [sys.executable, *sys.argv])
        self.token = uuid.uuid4().hex
        self.held = False
        self.created_folder = False

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": datetime.now().astimezone().isoformat(
            timespec="seconds"), "command": self.command, "token": self.token}

    def _read(self, path: Path) -> dict | None:
        try:
            holder = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, (json.dumps(self._record()) + "\n").encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return True

    def _stale(self, holder: dict) -> bool:
        """Whether `holder` is a lock of this host whose process is gone (or an earlier process with our pid)."""
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        if holder["pid"] == os.getpid():  # ours, or an earlier process that had our pid (a restarted container)
            return holder.get("token") not in _HELD
        return not _pid_alive(holder["pid"])

    def acquire(self) -> FolderLock:
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            self.created_folder = True
        _HELD.add(self.token)  # before the file exists: a thread of ours that reads it must see it held
        try:
            return self._acquire()
        except BaseException:
            _HELD.discard(self.token)
            raise

    def _acquire(self) -> FolderLock:
        unreadable_since = None
        for _ in range(100):
            if self._try_create():
                self.held = True
                return self
            holder = self._read(self.path)
            if holder == {}:  # released between our attempt and the read
                continue
            if holder is None:  # being written this very moment, or left half-written by a crash
                unreadable_since = unreadable_since or time.monotonic()
                if time.monotonic() - unreadable_since < 2.0:
                    time.sleep(0.05)
                    continue
                raise FolderLockedError(
                    f"{self.folder} is locked by {self.path}, which cannot be read (a crash while it was written?): "
                    f"if no run is using this folder, delete {self.path} and start again")
            if not self._stale(holder):
                if holder.get("host") != socket.gethostname():
                    raise FolderLockedError(
                        f"{self.folder} is in use by another run ({_describe(holder)}). That host is not this one, "
                        f"so the lock cannot be checked from here: if that run is over (or the host is dead), delete "
                        f"{self.path} and start again")
                raise FolderLockedError(f"{self.folder} is in use by another run ({_describe(holder)}): wait for it "
                                        "to finish or stop it, or choose another folder")
            # stale: move it aside (atomic; of two processes taking it over only one moves this very file)
            aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.token}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            moved = self._read(aside)
            if moved is None or moved.get("token") != holder.get("token"):
                # another process took the stale lock over between our read and the rename: give it back
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                aside.unlink(missing_ok=True)
                continue
            aside.unlink(missing_ok=True)
            warnings.warn(f"taking over the stale lock {self.path} of a run that is no longer running "
                          f"({_describe(holder)})", stacklevel=2)
        raise FolderLockedError(f"could not lock {self.folder}: {self.path} keeps changing (another run starting?)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _HELD.discard(self.token)
        holder = self._read(self.path)
        if holder and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        if self.created_folder:
            try:
                self.folder.rmdir()  # only if the run left nothing in the folder it created
            except OSError:
                pass

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def locked_folder(folder, *, create: bool = True, command: list[str] | None = None):
    """Hold `folder`'s lock for the body (main process only); `FolderLockedError` becomes a clear error (exit 2).

    `create=False` (a resumed run) locks only a folder that exists; a missing one is left to the caller's own
    error. The folder is created when needed, and removed again at release if the run left it empty."""
    from .cli import fail

    folder = Path(folder)
    if not is_launch_main_process() or (not create and not folder.is_dir()):
        yield None
        return
    lock = FolderLock(folder, command)
    try:
        lock.acquire()
    except FolderLockedError as err:
        fail(str(err))
    try:
        yield lock
    finally:
        lock.release()


def run_locked(args, body) -> None:
    """`body(args)` for a run in `args.out`: the path checked first, and the folder locked for the whole run."""
    from .cli import check_out_path

    check_out_path(args.out)
    with locked_folder(args.out, create=not args.resume):
        body(args)
