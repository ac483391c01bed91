"""Unix socket files: is someone listening, and removing one nobody listens on."""
from __future__ import annotations

import errno
import os
import socket
import stat

# A local listener accepts at once; a full backlog still answers within this.
PROBE_TIMEOUT_S = 1.0


def is_listening(path: str) -> bool:
    """True when a process accepts connections on the Unix socket `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT_S)
    try:
        probe.connect(path)
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
