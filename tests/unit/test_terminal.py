"""The host end of a container's terminal: the master reaches the engine as runc sends it, the
slave stays raw, input and window sizes come out of it, and output goes into it.

The engine here is a fake receiver: a listening Unix socket that takes the one message, as
containerd's runc shim (go-runc's console socket) does.
"""
from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
import tempfile
import termios

import pytest

from runtime.oci.spec import SpecError, parse_process
from runtime.sandbox.terminal import MASTER_NAME, ConsoleError, HostConsole, send_master, window_size

# Bounds for waits on the event loop; reached only when something is broken.
DEADLINE_S = 10.0


class FakeEngine:
    """A console socket, and the master received on it."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "console.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.master = -1

    def receive(self) -> bytes:
        """The payload; the fd becomes self.master. Exactly one fd, or the test fails."""
        conn, _ = self.listener.accept()
        with conn:
            payload, fds, _, _ = socket.recv_fds(conn, 4096, 4)
        assert len(fds) == 1, fds
        self.master = fds[0]
        return payload

    def close(self) -> None:
        self.listener.close()
        if self.master >= 0:
            os.close(self.master)


@pytest.fixture
def engine():
    with tempfile.TemporaryDirectory(prefix="ktt-con-", dir="/tmp") as directory:  # a short socket path
        fake = FakeEngine(directory)
        yield fake
        fake.close()


@pytest.fixture
def console(engine):
    opened = HostConsole.open(engine.path)
    yield opened
    opened.close()


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _read_exactly(fd: int, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = os.read(fd, count - len(data))
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


def test_the_master_is_sent_as_runc_sends_it_and_bytes_pass_both_ways_unchanged(engine, console):
    assert engine.receive() == MASTER_NAME
    assert os.isatty(engine.master)
    # Engine -> process: typed bytes arrive as they were typed (no ICRNL, no ^C turned into a signal).
    typed = b"echo hi\r\x03\x04\n"
    os.write(engine.master, typed)
    os.set_blocking(console.fd, True)
    assert _read_exactly(console.fd, len(typed)) == typed
    # Process -> engine: the guest's pty did the output processing already; nothing is added here.
    output = b"hi\n\r\n\x1b[31m"
    os.write(console.fd, output)
    assert _read_exactly(engine.master, len(output)) == output


def test_the_slave_is_raw(engine, console):
    iflag, oflag, cflag, lflag, _, _, cc = termios.tcgetattr(console.fd)
    assert not lflag & (termios.ECHO | termios.ICANON | termios.ISIG | termios.IEXTEN)
    assert not oflag & termios.OPOST
    assert not iflag & (termios.ICRNL | termios.IXON | termios.INLCR | termios.IGNCR)
    assert cflag & termios.CSIZE == termios.CS8
    assert (cc[termios.VMIN], cc[termios.VTIME]) == (1, 0)


def test_a_size_change_on_the_master_is_seen_once(engine, console):
    engine.receive()
    assert console.size_change() is None  # never set: nothing to pass on
    _set_size(engine.master, 40, 132)
    assert window_size(console.fd) == (40, 132)
    assert console.size_change() == (40, 132)
    assert console.size_change() is None
    _set_size(engine.master, 41, 132)
    assert console.size_change() == (41, 132)


def test_input_is_relayed_in_order_until_the_engine_hangs_up(engine, console):
    engine.receive()
    typed = []

    async def body() -> None:
        all_typed = asyncio.Event()

        async def write(data: bytes) -> None:
            typed.append(data)
            if b"".join(typed) == b"first second":
                all_typed.set()

        relay = asyncio.ensure_future(console.relay_input(write))
        os.write(engine.master, b"first ")
        os.write(engine.master, b"second")
        await asyncio.wait_for(all_typed.wait(), DEADLINE_S)
        os.close(engine.master)
        engine.master = -1
        await asyncio.wait_for(relay, DEADLINE_S)  # returns at the hang-up

    asyncio.run(body())
    assert b"".join(typed) == b"first second"


def test_window_sizes_are_passed_on_at_once_and_on_change(engine, console):
    engine.receive()
    _set_size(engine.master, 24, 80)
    sizes: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

    async def resize(rows: int, cols: int) -> None:
        await sizes.put((rows, cols))

    async def body() -> None:
        watch = asyncio.ensure_future(console.watch_size(resize, interval_s=0.01))
        try:
            assert await asyncio.wait_for(sizes.get(), DEADLINE_S) == (24, 80)
            _set_size(engine.master, 50, 100)
            assert await asyncio.wait_for(sizes.get(), DEADLINE_S) == (50, 100)
            assert sizes.empty()
        finally:
            watch.cancel()

    asyncio.run(body())


def test_the_slave_never_becomes_the_shims_controlling_terminal(engine):
    # The shim leads its own session with no terminal. Were the slave to become its controlling
    # terminal, the engine closing its master would hang it up and SIGHUP the shim itself.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            console = HostConsole.open(engine.path)
            with open("/proc/self/stat") as stat:
                tty_nr = stat.read().rsplit(")", 1)[1].split()[4]
            os.write(write_end, tty_nr.encode())
            console.close()
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        tty_nr = reader.read()
    os.waitpid(pid, 0)
    engine.receive()
    assert tty_nr == b"0"


def test_a_console_socket_nobody_listens_on_is_named(tmp_path):
    missing = str(tmp_path / "nobody.sock")
    master, slave = os.openpty()
    try:
        with pytest.raises(ConsoleError, match=f"--console-socket {missing}: .*is the engine listening there"):
            send_master(missing, master)
    finally:
        os.close(master)
        os.close(slave)


def test_a_failed_open_leaves_no_pty_behind(tmp_path):
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ConsoleError):
        HostConsole.open(str(tmp_path / "nobody.sock"))
    assert set(os.listdir("/proc/self/fd")) == before


def test_process_terminal_is_parsed_and_must_be_a_boolean():
    assert parse_process({"args": ["sh"], "terminal": True}, "config.json").terminal is True
    assert parse_process({"args": ["sh"]}, "config.json").terminal is False
    with pytest.raises(SpecError, match="process.terminal must be true or false, got 'yes'"):
        parse_process({"args": ["sh"], "terminal": "yes"}, "config.json")
