"""Advisory file locks (flock) between processes: one holder, bounded waits, released by a crash.

flock, not a lock file's existence: the kernel drops the lock when its
holder's file descriptor closes, including when the holder is SIGKILLed, so
a crashed holder never blocks the next one.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import time
from typing import AsyncIterator, Iterator

# Re-trying a busy lock this often costs nothing next to what it guards
# (template creation: seconds) and keeps the waiter's latency low.
POLL_S = 0.05


class LockTimeoutError(TimeoutError):
    """The lock stayed held by another process for the whole wait."""


def _open(path: str) -> int:
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise


def _timeout(path: str, timeout_s: float) -> LockTimeoutError:
    return LockTimeoutError(f"{path} stayed locked by another process for {timeout_s:.0f} s; "
                            "if no other factory or server is working, remove that file")


@contextlib.contextmanager
def exclusive(path: str, timeout_s: float) -> Iterator[None]:
    """Holds an exclusive flock on `path` (created if missing), waiting at most `timeout_s`."""
    fd = _open(path)
    try:
        deadline = time.monotonic() + timeout_s
        while not _try_lock(fd):
            if time.monotonic() >= deadline:
                raise _timeout(path, timeout_s)
            time.sleep(POLL_S)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.asynccontextmanager
async def exclusive_async(path: str, timeout_s: float) -> AsyncIterator[None]:
    """exclusive() for event-loop code: the wait does not block the loop."""
    fd = _open(path)
    try:
        deadline = time.monotonic() + timeout_s
        while not _try_lock(fd):
            if time.monotonic() >= deadline:
                raise _timeout(path, timeout_s)
            await asyncio.sleep(POLL_S)
        yield
    finally:
        os.close(fd)
