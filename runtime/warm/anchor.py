"""A warm shim's anchor: the container's host process as engines see it.

The client forks it (so it is the create command's child, adopted by the engine's subreaper when
the command exits) and it holds one end of a socket pair whose other end the shim holds. The shim
says its pid, then its exit status; the anchor exits with that status. Its catchable stop
signals go to the shim; if it is killed, the shim sees the socket close and stops the container,
as the container stops when runc's process is killed.
"""
from __future__ import annotations

import _signal
import _socket
import os

from runtime.warm import wire

# The status of a shim that vanished without saying (SIGKILL): 128 + 9, as a shell reports it.
VANISHED_STATUS = 128 + 9
# What the shim itself handles as "stop" (runtime/sandbox/shim.py); other signals kill the anchor,
# which the shim then sees.
PASSED_ON = (_signal.SIGTERM, _signal.SIGINT)


def start(anchor_fd: int, client: _socket.socket) -> int:
    """Forks the anchor (in the client); returns its pid."""
    pid = os.fork()
    if pid:
        os.close(anchor_fd)
        return pid
    try:
        client.close()
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # the container's stdio are the shim's to hold, not ours
            os.dup2(null, fd)
        _hold(_socket.socket(fileno=anchor_fd))
    finally:
        os._exit(VANISHED_STATUS)


def _hold(sock: _socket.socket) -> None:
    shim = 0

    def pass_on(number: int, _frame: object) -> None:
        if shim:
            try:
                os.kill(shim, number)
            except ProcessLookupError:
                pass

    for sig in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT):
        _signal.signal(sig, _signal.SIG_DFL)
    for sig in PASSED_ON:
        _signal.signal(sig, pass_on)
    while True:
        try:
            message, _ = wire.receive(sock)
        except (wire.WireError, OSError):
            return
        if "shim" in message:
            shim = int(message["shim"])
        if "exit" in message:
            os._exit(int(message["exit"]))


class Anchor:
    """The shim's side: the anchor's identity (the container's host pid) and the socket to it."""

    def __init__(self, pid: int, start_time: int, sock: _socket.socket) -> None:
        self.pid = pid
        self.start_time = start_time
        self.sock = sock

    def introduce(self) -> None:
        """Called in the shim: tells the anchor where signals go."""
        wire.send(self.sock, {"shim": os.getpid()})

    def exited(self, status: int) -> None:
        try:
            wire.send(self.sock, {"exit": status})
        except OSError:
            pass  # the anchor is gone: nobody waits for the status
