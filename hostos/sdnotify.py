"""sd_notify(3) in a few lines: tell systemd a Type=notify service is ready.

No dependency on libsystemd or a Python binding: the protocol is one
datagram of newline-separated KEY=VALUE lines to the Unix socket named by
$NOTIFY_SOCKET ("@" meaning the abstract namespace).
"""
from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Sends `state` (e.g. "READY=1\\nSTATUS=...") to systemd; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError:
            return False  # systemd gone or not listening: nothing to tell
    return True
