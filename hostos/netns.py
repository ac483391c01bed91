"""Network namespaces on the host: a new one for a process, joining one by path, running a child in
the one it came from.

Namespaces belong to threads: call `enter` from the main thread before any other thread starts
(a thread started before keeps the namespace it had; /proc/<pid>/ns/net shows the main thread's).
Sockets keep the namespace they were made in; Unix sockets are reached by path in any namespace,
but TCP connections made afterwards (an OTLP exporter's) start from the new namespace.
"""
from __future__ import annotations

import ctypes
import os
from typing import Callable

# <sched.h>
CLONE_NEWNET = 0x40000000

# The C library already loaded into this process: find_library("c") would run `ldconfig -p`
# (~7 ms) in every command that imports this module.
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)} (needs root)")


def enter(path: str | None) -> int | None:
    """Moves the calling thread into a new network namespace (`path` ""), or the one at `path`
    (a /proc/<pid>/ns/net or a bind-mounted netns file). Returns an fd (close-on-exec) of the
    namespace it was in, for `in_namespace`; None when `path` is None (nothing changes)."""
    if path is None:
        return None
    previous = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if path == "":
            _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        else:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _check(_libc.setns(target, CLONE_NEWNET), f"joining the network namespace {path}")
            finally:
                os.close(target)
    except BaseException:
        os.close(previous)
        raise
    return previous


def in_namespace(fd: int | None) -> Callable[[], None] | None:
    """A preexec function that moves a forked child into the network namespace `fd` names (None:
    the child stays where its parent is)."""
    if fd is None:
        return None

    def join() -> None:
        _check(_libc.setns(fd, CLONE_NEWNET), "returning to the host's network namespace")
    return join


def current_id(pid: int | str = "self") -> str:
    """The namespace's identity as the kernel names it ("net:[4026531840]")."""
    return os.readlink(f"/proc/{pid}/ns/net")
