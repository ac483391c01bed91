"""The shim's control channel: JSON lines over a Unix socket, stdio fds by SCM_RIGHTS.

Each kata-runtime command is a short-lived process; the shim is the one
long-lived owner of a sandbox's VM connection, and these are its requests:
  {"op": "start"} | {"op": "kill", "signal": N} | {"op": "wait"}
  {"op": "exec", "exec_id": ..., "process": {...}} with the caller's stdout/stderr fds attached
  {"op": "delete"}
Replies are {"ok": true, ...} or {"error": "..."}; exec and wait reply once
more with {"exit_status": N} when the process ends.
"""
from __future__ import annotations

import json
import socket
from typing import Any

from runtime.sandbox.state import ContainerError

# A reply is one short JSON line.
MAX_LINE = 1 << 16


def request(socket_path: str, message: dict[str, Any], fds: list[int] = (), timeout_s: float | None = 60.0) -> socket.socket:
    """Sends one request; returns the connected socket for reading replies."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(socket_path)
    except OSError as err:
        sock.close()
        raise ContainerError(f"the container's shim is not running ({socket_path}: {err.strerror})") from err
    payload = (json.dumps(message) + "\n").encode()
    if fds:
        socket.send_fds(sock, [payload], list(fds))
    else:
        sock.sendall(payload)
    return sock


def read_reply(sock: socket.socket) -> dict[str, Any]:
    line = b""
    while not line.endswith(b"\n"):
        # Peek, then take only through the newline: the shim may already have sent the next
        # message (a fast process's exit right behind the start reply), which the next call reads.
        chunk = sock.recv(4096, socket.MSG_PEEK)
        if not chunk:
            raise ContainerError("the container's shim closed the connection without answering")
        end = chunk.find(b"\n")
        line += sock.recv(len(chunk) if end < 0 else end + 1)
        if len(line) > MAX_LINE:
            raise ContainerError("the container's shim sent an oversized reply")
    reply = json.loads(line)
    if "error" in reply:
        raise ContainerError(reply["error"])
    return reply


def call(socket_path: str, message: dict[str, Any], timeout_s: float | None = 60.0) -> dict[str, Any]:
    with request(socket_path, message, timeout_s=timeout_s) as sock:
        return read_reply(sock)
