"""The host end of a container process's terminal, handed to the engine over --console-socket.

With process.terminal the real terminal is a pty in the guest (its line discipline echoes,
edits lines and turns ^C into SIGINT). The engine (containerd's runc shim, like anyone calling
runc with --console-socket) still expects a pty master of its own: runc's contract is one
sendmsg on that Unix socket carrying the master's path as the payload and the master as one
SCM_RIGHTS fd. So the shim makes a host pty pair, sends the master and keeps the slave, in raw
mode so the host adds no second line discipline. The slave carries bytes both ways: what the
engine writes to the master is read here and typed into the guest's pty (write_stdin), and the
guest's output is written here for the engine to read from the master.

Window sizes: the engine sets them with TIOCSWINSZ on its master. The SIGWINCH that follows goes
to the slave's foreground process group, and the shim is not one (the slave is not its
controlling terminal, nor can one shim have one per terminal), so the size is read from the
slave every WINSIZE_POLL_S instead and passed on when it changes.
"""
from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import os
import socket
import struct
import termios
from typing import Awaitable, Callable

from runtime.sandbox.state import ContainerError

# How often the window size is looked at: a redraw within a tenth of a second of a resize looks
# immediate to a person, and one ioctl per tick per terminal costs nothing measurable.
WINSIZE_POLL_S = 0.1
# Input is typed by people or pasted: one read of this much is one write_stdin.
INPUT_CHUNK_BYTES = 16 * 1024
# What runc sends as the message payload: the path of the master it sends.
MASTER_NAME = b"/dev/ptmx"
# The console socket is the engine's, made for this one message: if it does not take it at once,
# it is not listening.
CONNECT_TIMEOUT_S = 10.0

# termios attribute list indices (tcgetattr's order).
_IFLAG, _OFLAG, _CFLAG, _LFLAG, _CC = 0, 1, 2, 3, 6


class ConsoleError(ContainerError):
    """The console socket could not be used; the message names it."""


def make_raw(fd: int) -> None:
    """cfmakeraw(3): no echo, no line editing, no signals, no CR/NL translation either way."""
    attrs = termios.tcgetattr(fd)
    attrs[_IFLAG] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
                       | termios.IGNCR | termios.ICRNL | termios.IXON)
    attrs[_OFLAG] &= ~termios.OPOST
    attrs[_LFLAG] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    attrs[_CFLAG] = (attrs[_CFLAG] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    attrs[_CC][termios.VMIN] = 1
    attrs[_CC][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def send_master(socket_path: str, master_fd: int) -> None:
    """runc's SendFd: connect to the engine's console socket, send the master's path with the fd."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(socket_path)
            sock.sendmsg([MASTER_NAME], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [master_fd]))])
        except OSError as err:
            raise ConsoleError(f"cannot send the terminal to --console-socket {socket_path}: "
                               f"{err.strerror or err}; is the engine listening there?") from None


def window_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal `fd` is on; (0, 0) when nobody has set it."""
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return rows, cols


class HostConsole:
    """The slave of the pty whose master went to the engine."""

    def __init__(self, slave_fd: int) -> None:
        self.fd = slave_fd
        self._last_size = (0, 0)

    @classmethod
    def open(cls, console_socket: str) -> HostConsole:
        master, slave = os.openpty()
        try:
            make_raw(slave)
            os.set_blocking(slave, False)
            send_master(console_socket, master)
        except BaseException:
            os.close(slave)
            raise
        finally:
            os.close(master)  # the engine's copy keeps it open
        return cls(slave)

    def size_change(self) -> tuple[int, int] | None:
        """The window size if it changed since the last call (first call: if it was ever set)."""
        size = window_size(self.fd)
        if size == self._last_size:
            return None
        self._last_size = size
        return size

    async def relay_input(self, write: Callable[[bytes], Awaitable[None]]) -> None:
        """What the engine types, to `write`, in order, each write finished before the next read
        (a slow guest holds the engine's input back in the pty). Returns when the engine closes
        its master."""
        while True:
            await _readable(self.fd)
            try:
                data = os.read(self.fd, INPUT_CHUNK_BYTES)
            except BlockingIOError:
                continue
            except OSError as err:
                if err.errno == errno.EIO:  # the master is closed: hung up
                    return
                raise
            if not data:
                return
            await write(data)

    async def watch_size(self, resize: Callable[[int, int], Awaitable[None]],
                         interval_s: float = WINSIZE_POLL_S) -> None:
        """Calls `resize(rows, cols)` at once if a size is set, then on every change."""
        while True:
            change = self.size_change()
            if change is not None:
                await resize(*change)
            await asyncio.sleep(interval_s)

    def close(self) -> None:
        """The engine reads the end of output from its master (EIO) once this is closed."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
