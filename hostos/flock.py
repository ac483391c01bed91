"""Exclusive advisory locks on lock files (flock), waited for with a bound.

flock locks belong to the open file description: they are released when the
last process holding a copy of the fd closes it or dies, so a killed holder
never leaves a lock behind, and a child given the fd holds the lock too.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from typing import Iterator

# How often a waiter retries a held lock: short next to any operation worth locking.
RETRY_S = 0.02


class LockTimeoutError(TimeoutError):
    pass


def acquire(path: str, timeout_s: float) -> int:
    """An fd holding the exclusive lock on `path` (created if missing); LockTimeoutError after `timeout_s`.

    The lock file may be unlinked by a holder (see remove): a lock taken on an inode
    that is no longer at `path` is dropped and taken again on the new file."""
    deadline = time.monotonic() + timeout_s
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as err:
                    if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                if time.monotonic() > deadline:
                    raise LockTimeoutError(f"{path} is still locked after {timeout_s:.0f} s")
                time.sleep(RETRY_S)
            if _still_at(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def remove(path: str) -> None:
    """Unlinks the lock file; call it holding the lock. Waiters on the old inode then retry on a
    new file (see acquire), so removing a lock never lets two holders in at once."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def held(path: str, timeout_s: float) -> Iterator[int]:
    fd = acquire(path, timeout_s)
    try:
        yield fd
    finally:
        os.close(fd)


def _still_at(fd: int, path: str) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)
