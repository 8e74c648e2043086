"""One writer at a time, and only whole files.

`hold`: an advisory file lock (filelock) whose file also says who holds it. A sweep log or a report
folder written by two processes at once comes out interleaved, so whoever comes second is refused at
once, with the holder's pid and host. The operating system drops the lock when its process ends, even by
SIGKILL: a killed run never leaves a lock that blocks the next one (its stale holder line is overwritten
by the next holder).

`replacing`: a file is written beside its final name and renamed over it, so a reader, a second writer
or a killed run never sees half of it.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

import filelock


HOLDER_WAIT_S = 1.0  # how long a refused writer waits for the holder to name itself


class BusyError(RuntimeError):
    """Another process holds the lock."""


def lock_beside(path: Path) -> Path:
    """The lock file of the file at `path`, a hidden file beside it: every writer of that file holds this one."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def hold(lock_path: Path, what: str, elsewhere: str, wait_s: float = 0):
    """Hold the lock at `lock_path` (created if missing) for the `with` block, waiting up to `wait_s` for
    it, or raise BusyError saying that `what` is in use by whom and, in `elsewhere`, how to avoid waiting."""
    lock_path = Path(lock_path)
    lock = filelock.FileLock(lock_path)
    try:
        lock.acquire(timeout=wait_s)
    except filelock.Timeout:
        holder = _holder(lock_path) or "another process"
        raise BusyError(f"{what} is in use by {holder} (lock {lock_path}): wait for that run to finish or "
                        f"stop it, or {elsewhere}") from None
    try:
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        lock_path.write_text(f"pid {os.getpid()} on host {socket.gethostname()} since {started}\n",
                             encoding="utf-8")
        yield
    finally:
        lock_path.write_text("", encoding="utf-8")
        lock.release()


def _holder(lock_path: Path, wait_s: float = HOLDER_WAIT_S) -> str:
    """The holder line of a held lock; a holder writes it just after taking the lock, so an empty file is
    read again for up to `wait_s` before it is taken for an unnamed holder."""
    deadline = time.monotonic() + wait_s
    while True:
        holder = lock_path.read_text(encoding="utf-8", errors="replace").strip()
        if holder or time.monotonic() >= deadline:
            return holder
        time.sleep(0.01)


@contextlib.contextmanager
def replacing(path: Path):
    """A temporary path beside `path` to write into; renamed over `path` when the block ends without an
    error, removed when it raises."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
