"""Unix socket files: binding and connecting at any path length, is someone listening, and
removing one nobody listens on."""
from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Iterator

# A local listener accepts at once; a full backlog still answers within this.
PROBE_TIMEOUT_S = 1.0
# sun_path is 108 bytes with its terminating NUL (unix(7)); a longer path fails with
# "AF_UNIX path too long".
MAX_PATH_BYTES = 107


@contextlib.contextmanager
def _addressable(path: str) -> Iterator[str]:
    """`path`, or one that names the same file within sun_path: the socket's name below an O_PATH
    descriptor of its directory (/proc/self/fd/N/NAME; the kernel resolves it as it would `path`).
    Engines choose the state directories: Docker's runc root
    /var/run/docker/runtime-kata/moby/<64-hex id>/ leaves no room for a socket name."""
    if len(os.fsencode(path)) <= MAX_PATH_BYTES:
        yield path
        return
    directory, name = os.path.split(path)
    fd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def bind(sock: socket.socket, path: str) -> None:
    """sock.bind(path), for a path of any length."""
    with _addressable(path) as address:
        sock.bind(address)


def connect(sock: socket.socket, path: str) -> None:
    """sock.connect(path), for a path of any length (a blocking connect: the name must stay valid
    until it returns)."""
    with _addressable(path) as address:
        sock.connect(address)


def is_listening(path: str) -> bool:
    """True when a process accepts connections on the Unix socket `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT_S)
    try:
        connect(probe, path)
        return True
    except OSError as err:
        if err.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise
    finally:
        probe.close()


def remove_stale(path: str) -> bool:
    """Removes `path` if it is a socket nobody listens on (its server died); True if removed."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except FileNotFoundError:
        return False
    if is_listening(path):
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return True
