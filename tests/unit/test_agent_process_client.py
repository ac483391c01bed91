"""factory/agent/client.py's process calls against the real agent loop on a Unix socket (no VM).

The agent (handler + service) runs in a thread behind a listening socket, as QEMU's chardev
would be; processes are real, with rootfs "/".
"""
import asyncio
import os
import signal
import socket
import tempfile
import threading

import pytest

from factory.agent.client import AgentClient
from factory.errors import AgentError, AgentTimeoutError
from guest.agent.fakeroot import FakeGuest
from guest.agent.handler import AgentHandler
from guest.agent.service import AgentService

HOST_ENV = ["PATH=/usr/local/bin:/usr/bin:/bin"]


class ThreadedAgent:
    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "agent.sock")
        self.handler = AgentHandler(FakeGuest(os.path.join(directory, "guest")).root)
        self.service = None
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(self.path)
        self._listener.listen(1)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        conn.setblocking(False)
        self._conn = conn
        self.service = AgentService(conn.fileno(), self.handler)
        self._ready.set()
        self.service.run()

    def close(self) -> None:
        if self._ready.wait(5):
            self.service.stop()
        self._thread.join(timeout=5)
        self._listener.close()
        for proc in self.handler.processes._procs.values():
            if proc.state != "exited":
                os.kill(proc.pid, signal.SIGKILL)
        self.handler.processes.close()


@pytest.fixture
def agent():
    with tempfile.TemporaryDirectory(prefix="kvf-proc-", dir="/tmp") as directory:
        a = ThreadedAgent(directory)
        yield a
        a.close()


def _process(exec_id, args, **overrides):
    fields = dict(exec_id=exec_id, args=args, env=HOST_ENV, cwd="/", uid=os.getuid(), gid=os.getgid(),
                  additional_gids=os.getgroups(), rootfs="/", rootfs_readonly=False, hostname="",
                  guest_root=True)
    fields.update(overrides)
    return fields


async def _collect(client, exec_id):
    """(stdout, stderr, exit_status) from the event queue, as runtime/sandbox/shim.py reads it."""
    out = {1: b"", 2: b""}
    while True:
        event = await asyncio.wait_for(client.events.get(), 10)
        kind = event.WhichOneof("kind")
        if kind == "process_output" and event.process_output.exec_id == exec_id:
            out[event.process_output.stream] += event.process_output.data
        elif kind == "process_exited" and event.process_exited.exec_id == exec_id:
            return out[1], out[2], event.process_exited.exit_status


def test_create_start_output_and_wait(agent):
    async def body():
        client = AgentClient(agent.path)
        await client.connect(5)
        try:
            pid = await client.create_process(**_process("c1", ["sh", "-c", "echo hi; echo err >&2; exit 3"]))
            assert pid > 0
            waiting = asyncio.ensure_future(client.wait_process("c1"))
            await client.start_process("c1")
            assert await _collect(client, "c1") == (b"hi\n", b"err\n", 3)
            assert await asyncio.wait_for(waiting, 10) == 3
        finally:
            await client.close()
    asyncio.run(body())


def test_errors_come_back_as_agent_errors(agent):
    async def body():
        client = AgentClient(agent.path)
        await client.connect(5)
        try:
            with pytest.raises(AgentError, match="executable 'no-such-binary' not found in rootfs /"):
                await client.create_process(**_process("c1", ["no-such-binary"]))
            with pytest.raises(AgentError, match="no process with exec_id 'ghost'"):
                await client.signal_process("ghost", signal.SIGTERM)
        finally:
            await client.close()
    asyncio.run(body())


def test_signal_stdin_and_a_wait_with_its_own_timeout(agent):
    async def body():
        client = AgentClient(agent.path)
        await client.connect(5)
        try:
            await client.create_process(**_process("cat", ["cat"]), open_stdin=True)
            await client.start_process("cat")
            await client.write_stdin("cat", b"one\n")
            await client.close_stdin("cat")
            assert await _collect(client, "cat") == (b"one\n", b"", 0)

            await client.create_process(**_process("sleeper", ["sleep", "30"]))
            await client.start_process("sleeper")
            with pytest.raises(AgentTimeoutError):
                await client.wait_process("sleeper", timeout_s=0.2)
            await client.signal_process("sleeper", signal.SIGKILL)
            assert await client.wait_process("sleeper") == 137
            with pytest.raises(AgentError, match="not running"):
                await client.signal_process("sleeper", signal.SIGKILL)
        finally:
            await client.close()
    asyncio.run(body())


def test_wait_process_has_no_default_timeout():
    import inspect

    assert inspect.signature(AgentClient.wait_process).parameters["timeout_s"].default is None
    assert inspect.signature(AgentClient.start_process).parameters["timeout_s"].default is not None


def test_a_terminal_process_with_its_size_set_before_start(agent):
    async def body():
        client = AgentClient(agent.path)
        await client.connect(5)
        try:
            await client.create_process(**_process("t1", ["sh", "-c", "stty size; read line; echo got $line"]),
                                        terminal=True)
            await client.resize_console("t1", 40, 120)
            await client.start_process("t1")
            await client.write_stdin("t1", b"typed\n")
            stdout, stderr, status = await _collect(client, "t1")
            # The echo comes as the line is typed: before or after stty's output.
            assert sorted(stdout.split(b"\r\n")) == [b"", b"40 120", b"got typed", b"typed"]
            assert (stdout.endswith(b"got typed\r\n"), stderr, status) == (True, b"", 0)
            with pytest.raises(AgentError, match="process 't1' is not running"):
                await client.resize_console("t1", 1, 1)
        finally:
            await client.close()
    asyncio.run(body())
