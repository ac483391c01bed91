"""The shim's control channel: length-prefixed JSON frames over a Unix socket, stdio fds by SCM_RIGHTS.

Each kata-runtime command is a short-lived process; the shim is the one
long-lived owner of a sandbox's VM connection, and these are its requests:
  {"op": "start"} | {"op": "kill", "signal": N, "all": bool} | {"op": "wait"} | {"op": "ps"}
  {"op": "pause"} | {"op": "resume"} | {"op": "delete"}
  {"op": "exec", "exec_id": ..., "process": {...}, "console_socket": path or ""} with the
      caller's stdin, stdout and stderr attached; later frames on the same connection:
      {"op": "signal", "signal": N} for the exec's process
Replies are {"ok": true, ...} or {"error": "..."}; exec and wait reply once
more with {"exit_status": N} when the process ends. An exec's stdio does not
travel on this socket: the shim reads and writes the caller's fds itself, so a
slow reader blocks the shim's write and, through it, the process. An exec's
connection is its life line: closed before the process exits, the shim kills it.

A frame is a 4-byte big-endian payload length and the payload (one JSON
object): two replies in one read, or one reply over many, decode the same.
"""
from __future__ import annotations

import array
import json
import os
import socket
import struct
from typing import TYPE_CHECKING, Any

from hostos import sockets
from runtime.sandbox.state import ContainerError

if TYPE_CHECKING:
    import asyncio

HEADER = struct.Struct(">I")
# A request carries one OCI process (args, env): a few KiB. The cap only bounds what a corrupt
# length prefix can make a reader buffer.
MAX_PAYLOAD = 1 << 20
# stdin, stdout and stderr of an exec.
MAX_FDS = 3


class FrameError(ContainerError):
    """The peer sent something that is not a frame of this protocol."""


def encode(message: dict[str, Any]) -> bytes:
    payload = json.dumps(message).encode()
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"control message of {len(payload)} bytes is over {MAX_PAYLOAD}; "
                         "shorten the process's args and env")
    return HEADER.pack(len(payload)) + payload


def payload_length(header: bytes) -> int:
    (length,) = HEADER.unpack(header)
    if length > MAX_PAYLOAD:
        raise FrameError(f"control frame of {length} bytes is over {MAX_PAYLOAD}: "
                         "the peer is not a kata-runtime shim of this version")
    return length


def decode(payload: bytes) -> dict[str, Any]:
    try:
        message = json.loads(payload)
    except ValueError as err:
        raise FrameError(f"control frame is not JSON: {err}") from None
    if not isinstance(message, dict):
        raise FrameError(f"control frame is {type(message).__name__}, not a JSON object")
    return message


class FrameDecoder:
    """Incremental: feed() arbitrary chunks, get back the complete messages in order."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._early: list[dict[str, Any]] = []

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        self._buffer += chunk
        messages, self._early = self._early, []
        while len(self._buffer) >= HEADER.size:
            length = payload_length(bytes(self._buffer[:HEADER.size]))
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            messages.append(decode(bytes(self._buffer[HEADER.size:end])))
            del self._buffer[:end]
        return messages

    @property
    def pending(self) -> int:
        """Bytes of a frame begun but not complete."""
        return len(self._buffer)

    def unread(self, messages: list[dict[str, Any]]) -> None:
        """Puts decoded messages back, to come first from the next feed()."""
        self._early = messages + self._early


# ---- client side (the short-lived kata-runtime commands) ---------------------


class Connection:
    """One request's connection: replies are read one frame at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._decoder = FrameDecoder()
        self._ready: list[dict[str, Any]] = []

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def read_reply(self) -> dict[str, Any]:
        """The next reply; an {"error": ...} reply is raised as ContainerError."""
        while not self._ready:
            try:
                chunk = self.sock.recv(1 << 16)
            except socket.timeout:
                raise ContainerError("the container's shim did not answer in time; "
                                     "see shim.log in the container's state directory") from None
            if not chunk:
                what = "in the middle of a reply" if self._decoder.pending else "without answering"
                raise ContainerError(f"the container's shim closed the connection {what}")
            self._ready.extend(self._decoder.feed(chunk))
        reply = self._ready.pop(0)
        if "error" in reply:
            raise ContainerError(str(reply["error"]))
        return reply


def request(socket_path: str, message: dict[str, Any], fds: list[int] = (),
            timeout_s: float | None = 60.0) -> Connection:
    """Sends one request (with `fds` attached); returns the connection to read replies from."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sockets.connect(sock, socket_path)
    except OSError as err:
        sock.close()
        raise ContainerError(f"the container's shim is not running ({socket_path}: {err.strerror})") from err
    frame = encode(message)
    try:
        if fds:
            sent = socket.send_fds(sock, [frame], list(fds))
            if sent < len(frame):  # never an empty send: the shim may have answered and closed
                sock.sendall(frame[sent:])
        else:
            sock.sendall(frame)
    except OSError as err:
        sock.close()
        raise ContainerError(f"sending {message.get('op')!r} to the container's shim failed: {err}") from err
    return Connection(sock)


def call(socket_path: str, message: dict[str, Any], timeout_s: float | None = 60.0) -> dict[str, Any]:
    with request(socket_path, message, timeout_s=timeout_s) as conn:
        return conn.read_reply()


# ---- server side (the shim) ---------------------------------------------------


async def receive_request(sock: socket.socket, decoder: FrameDecoder | None = None
                          ) -> tuple[dict[str, Any], list[int]]:
    """The first frame on a new connection and the fds that came with it (non-blocking `sock`);
    frames after it stay in `decoder` (see ExecChannel).

    asyncio's streams drop ancillary data, so the request is read with recvmsg here."""
    import asyncio  # the shim's side only: the commands (clients) start faster without it

    loop = asyncio.get_running_loop()
    decoder = decoder if decoder is not None else FrameDecoder()
    fds: list[int] = []
    try:
        while True:
            data, fds_now = await _recv_with_fds(loop, sock)
            fds.extend(fds_now)
            if not data:
                raise FrameError("the client closed the connection before its request was complete")
            messages = decoder.feed(data)
            if messages:
                decoder.unread(messages[1:])
                return messages[0], fds
    except BaseException:
        for fd in fds:
            _close_quietly(fd)
        raise


class ExecChannel:
    """The shim's side of an exec's connection after the request: the caller's later frames
    (signals to forward) and its end."""

    def __init__(self, sock: socket.socket, decoder: FrameDecoder) -> None:
        self.sock = sock
        self.decoder = decoder

    def peer_pid(self) -> int:
        """The host pid of the process on the other end (the exec's holder)."""
        creds = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, _uid, _gid = struct.unpack("3i", creds)
        return pid

    async def messages(self):
        """The caller's frames until it closes the connection (or sends garbage)."""
        import asyncio

        loop = asyncio.get_running_loop()
        for message in self.decoder.feed(b""):
            yield message
        while True:
            try:
                chunk = await loop.sock_recv(self.sock, 4096)
                messages = self.decoder.feed(chunk) if chunk else None
            except (OSError, FrameError):
                return
            if messages is None:
                return
            for message in messages:
                yield message


def _set_once(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def _recv_with_fds(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    while True:
        try:
            data, ancillary, _flags, _addr = sock.recvmsg(1 << 16, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
            break
        except BlockingIOError:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(sock.fileno(), _set_once, ready)
            try:
                await ready
            finally:
                loop.remove_reader(sock.fileno())
    for level, kind, blob in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(blob[:len(blob) - len(blob) % fds.itemsize])
    return data, list(fds)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
