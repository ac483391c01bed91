"""Advisory file locks (flock) between processes: one holder, bounded waits, released by a crash.

flock, not a lock file's existence: the kernel drops the lock when its
holder's file descriptor closes, including when the holder is SIGKILLed, so
a crashed holder never blocks the next one.
"""
from __future__ import annotations

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


def _still_linked(fd: int, path: str) -> bool:
    """True when `fd` is still the file at `path`: a holder may unlink the lock file
    (destroy cleans up after itself), and a lock on the unlinked file guards nothing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _acquire_once(path: str) -> int | None:
    """The locked fd of `path`, or None while another process holds it."""
    while True:
        fd = _open(path)
        try:
            if not _try_lock(fd):
                os.close(fd)
                return None
            if _still_linked(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # locked a file its holder removed: take the new one


def try_acquire(path: str) -> int | None:
    """acquire() without waiting: None while another process holds the lock."""
    return _acquire_once(path)


def acquire(path: str, timeout_s: float) -> int:
    """An fd holding the exclusive lock on `path` (created if missing); LockTimeoutError after
    `timeout_s`. Closing the fd (or the death of every process holding a copy) releases it, so the
    fd can be handed to a child that must keep the lock."""
    deadline = time.monotonic() + timeout_s
    while (fd := _acquire_once(path)) is None:
        if time.monotonic() >= deadline:
            raise _timeout(path, timeout_s)
        time.sleep(POLL_S)
    return fd


def remove(path: str) -> None:
    """Unlinks the lock file; call it holding the lock. Waiters on the old file then take a new
    one (see _acquire_once), so removing a lock never lets two holders in at once."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def exclusive(path: str, timeout_s: float) -> Iterator[None]:
    """Holds an exclusive flock on `path` (created if missing), waiting at most `timeout_s`.

    The holder may unlink `path` before leaving; later lockers then use a new file.
    """
    fd = acquire(path, timeout_s)
    try:
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.asynccontextmanager
async def exclusive_async(path: str, timeout_s: float) -> AsyncIterator[None]:
    """exclusive() for event-loop code: the wait does not block the loop."""
    import asyncio  # here: the runtime's short commands take locks without an event loop

    deadline = time.monotonic() + timeout_s
    while (fd := _acquire_once(path)) is None:
        if time.monotonic() >= deadline:
            raise _timeout(path, timeout_s)
        await asyncio.sleep(POLL_S)
    try:
        yield
    finally:
        os.close(fd)
