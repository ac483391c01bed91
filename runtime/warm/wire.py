"""Messages between the thin client, the warm server's worker and a shim's anchor: a 4-byte
length and a marshalled dict of plain values, with file descriptors (SCM_RIGHTS) riding on the
length.

marshal, not JSON: json's import (re) is a third of the thin client's start-up, and both ends are
this program run by one user: the server takes connections of its own user only (SO_PEERCRED),
the client talks only to a server of its own user or root, in a directory only they can write.
The low-level _socket and _signal modules are used for the same reason (socket and signal
import enum)."""
from __future__ import annotations

import _socket
import array
import marshal
import os
import struct

# typing (and re, which it imports) only for the type checker: see above.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# The peer's credentials (struct ucred: pid, uid, gid).
_UCRED = struct.Struct("3i")
# A command's request carries its argv and environment; an engine's environment is a few KiB.
MAX_MESSAGE_BYTES = 1 << 20
# stdin, stdout, stderr and the working directory, or an anchor's socket.
MAX_FDS = 8
_HEADER = struct.Struct("!I")


class WireError(Exception):
    """The peer went away or sent something that is not a message."""


def send(sock: _socket.socket, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    payload = marshal.dumps(message)
    data = _HEADER.pack(len(payload)) + payload
    ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sent = sock.sendmsg([data], ancillary)
    if sent < len(data):
        sock.sendall(data[sent:])


def receive(sock: _socket.socket) -> tuple[dict[str, Any], list[int]]:
    """The next message and the fds that came with it (the caller owns and closes them).
    WireError at end of stream or on a malformed message."""
    fd_space = _socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
    header, ancillary, _, _ = sock.recvmsg(_HEADER.size, fd_space, _socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[:len(data) - len(data) % received.itemsize])
            fds.extend(received)
    try:
        header += _read_exactly(sock, _HEADER.size - len(header))
        (length,) = _HEADER.unpack(header)
        if length > MAX_MESSAGE_BYTES:
            raise WireError(f"a message of {length} bytes (at most {MAX_MESSAGE_BYTES})")
        message = marshal.loads(_read_exactly(sock, length))
        if not isinstance(message, dict):
            raise WireError("a message that is not a dict")
    except (WireError, ValueError, EOFError, TypeError) as err:
        _close_all(fds)
        raise WireError(str(err)) from None
    return message, fds


def _read_exactly(sock: _socket.socket, count: int) -> bytes:
    chunks = []
    while count:
        chunk = sock.recv(count)
        if not chunk:
            raise WireError("the peer closed the connection")
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def _close_all(fds: list[int]) -> None:

    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def peer_uid(sock: _socket.socket) -> int:
    return _UCRED.unpack(sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _UCRED.size))[1]
