"""The VMCache Unix socket: refuse a live server's, replace a stale one."""
from __future__ import annotations

import errno
import os
import socket
import stat

from factory.errors import FactoryError


def claim(path: str) -> None:
    """Makes `path` free for a new server, or raises if another server listens there."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FactoryError(f"{path} exists and is not a socket; move it away or set factory.vm_cache_endpoint")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as err:
        if err.errno in (errno.ECONNREFUSED, errno.ENOENT):
            # Nobody listens: a server that crashed (or was SIGKILLed) left it.
            os.unlink(path)
            return
        raise FactoryError(f"cannot tell whether a VMCache server owns {path}: {err}") from err
    finally:
        probe.close()
    raise FactoryError(f"{path} is in use by a running VMCache server; stop it with "
                       "`kata-runtime factory destroy` first")


def release(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
