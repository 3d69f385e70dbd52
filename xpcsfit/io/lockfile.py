"""The one exclusive lock of xpcsfit: a lock file held with ``flock``, naming its holder.

Used for a result directory being written (:mod:`xpcsfit.io.result_dir`) and for the
batch catalogue's one writer (:mod:`xpcsfit.batch.catalogue`). The lock dies with its
process (a killed run never leaves a stale lock); the file is removed on release.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path


class LockHeld(Exception):
    """Another process holds the lock; ``holder`` is what it wrote ("pid N on HOST")."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def take_lock(path: str | Path) -> int:
    """Take the exclusive lock of the file ``path`` (created if absent) without waiting.

    Returns the open file descriptor that holds it (give it to :func:`release_lock`).

    Raises
    ------
    LockHeld
        Another process holds it.
    """
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockHeld(holder) from None
        # The holder before us may have unlinked the file between our open and flock.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    return fd


def release_lock(path: str | Path, fd: int) -> None:
    """Remove the lock file ``path`` and release the lock held by ``fd``."""
    with contextlib.suppress(FileNotFoundError):
        Path(path).unlink()
    os.close(fd)
