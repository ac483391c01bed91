"""factory/agent/client.py against the real agent (handler + service loop) on a Unix socket.

The guest side runs in a thread over a fake /proc and /sys tree; no VM.
"""
import asyncio
import os
import socket
import tempfile
import threading
import time

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from factory.agent.client import AgentClient
from factory.errors import AgentError, AgentTimeoutError
from guest.agent import AGENT_VERSION
from guest.agent.fakeroot import BOOT_ID, FakeGuest, can_reseed_host_crng
from guest.agent.handler import AgentHandler
from guest.agent.service import AgentService
from protocols.agent.framing import PROTOCOL_VERSION

_exporter = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(_exporter))
trace.set_tracer_provider(_provider)


class GuestAgent:
    """QEMU's side of the chardev (a listening Unix socket) with the agent behind it."""

    def __init__(self, directory: str, guest: FakeGuest, listen: bool = True) -> None:
        self.path = os.path.join(directory, "agent.sock")
        self.guest = guest
        self.clock_set_to = []
        self.service = None
        self._thread = None
        self._listener = None
        if listen:
            self.listen()

    def listen(self) -> None:
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(self.path)
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        conn.setblocking(False)
        self.connection = conn
        handler = AgentHandler(self.guest.root, set_realtime_ns=self.clock_set_to.append)
        self.service = AgentService(conn.fileno(), handler)
        self.service.enqueue(handler.startup_messages())
        self.service.run()

    def close(self) -> None:
        if self.service is not None:
            self.service.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()


@pytest.fixture
def short_dir():
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="kvf-agent-", dir="/tmp") as directory:
        yield directory


@pytest.fixture
def guest(tmp_path):
    return FakeGuest(str(tmp_path))


@pytest.fixture
def agent(short_dir, guest):
    server = GuestAgent(short_dir, guest)
    yield server
    server.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def connected(path: str, timeout_s: float = 5.0) -> AgentClient:
    client = AgentClient(path)
    await client.connect(timeout_s)
    return client


def test_every_request_round_trips(agent, guest):
    guest.add_cpu(1)
    guest.add_memory_blocks([8])

    async def body():
        client = await connected(agent.path)
        try:
            check = await client.check()
            assert (check.agent_version, check.protocol_version) == (AGENT_VERSION, PROTOCOL_VERSION)
            details = await client.get_guest_details()
            assert details.boot_id == BOOT_ID and details.mem_total_kib == 500_000
            await client.set_guest_date_time(1_700_000_000, 42)
            assert agent.clock_set_to == [1_700_000_000_000_042_000]
            first, second = await client.read_random(64), await client.read_random(64)
            assert len(first) == 64 and first != second
            # startup onlined cpu1 already; a new one arrives offline
            guest.add_cpu(2)
            online = await client.online_cpu_mem(nb_cpus=3, wait=True)
            assert (online.onlined_cpus, online.online_cpus) == (1, 3)
            if can_reseed_host_crng():
                await client.reseed_random_dev(os.urandom(64))
                handoff = await client.handoff(os.urandom(64), 1_700_000_001, 7)
                assert (handoff.agent_version, handoff.protocol_version) == (AGENT_VERSION, PROTOCOL_VERSION)
                assert agent.clock_set_to[-1] == 1_700_000_001_000_007_000
        finally:
            await client.close()

    run(body())


def test_guest_error_raises_agent_error_with_its_message(agent):
    async def body():
        client = await connected(agent.path)
        try:
            with pytest.raises(AgentError, match="length=5000 is outside 1..4096"):
                await client.read_random(5000)
            # the channel is still usable afterwards
            assert (await client.check()).protocol_version == PROTOCOL_VERSION
        finally:
            await client.close()

    run(body())


def test_concurrent_requests_are_matched_by_id(agent):
    async def body():
        client = await connected(agent.path)
        try:
            lengths = list(range(1, 41))
            results = await asyncio.gather(*(client.read_random(n) for n in lengths))
            assert [len(r) for r in results] == lengths
        finally:
            await client.close()

    run(body())


def test_agent_started_event_reaches_the_queue(agent):
    async def body():
        client = await connected(agent.path)
        try:
            event = await asyncio.wait_for(client.events.get(), 5)
            assert event.agent_started.boot_id == BOOT_ID
        finally:
            await client.close()

    run(body())


def test_timeout_names_request_and_socket(short_dir, guest):
    # A chardev with no agent behind it: accepts and never answers.
    path = os.path.join(short_dir, "silent.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)

    async def body():
        client = await connected(path)
        try:
            started = time.monotonic()
            with pytest.raises(AgentTimeoutError) as info:
                await client.check(timeout_s=0.2)
            assert time.monotonic() - started < 2
            assert "Check" in str(info.value) and path in str(info.value)
        finally:
            await client.close()

    try:
        run(body())
    finally:
        listener.close()


def test_connect_retries_until_the_socket_appears(short_dir, guest):
    server = GuestAgent(short_dir, guest, listen=False)
    timer = threading.Timer(0.3, server.listen)
    timer.start()

    async def body():
        client = await connected(server.path, timeout_s=5)
        try:
            assert (await client.check()).agent_version == AGENT_VERSION
        finally:
            await client.close()

    try:
        run(body())
    finally:
        timer.join()
        server.close()


def test_connect_gives_up_at_the_deadline(short_dir):
    path = os.path.join(short_dir, "never.sock")

    async def body():
        client = AgentClient(path)
        with pytest.raises(AgentTimeoutError, match=path):
            await client.connect(0.2)

    run(body())


def test_guest_hanging_up_fails_pending_calls_at_once(short_dir, guest):
    path = os.path.join(short_dir, "hangup.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)

    def accept_then_hang_up():
        conn, _ = listener.accept()
        conn.recv(100)
        conn.close()

    thread = threading.Thread(target=accept_then_hang_up, daemon=True)
    thread.start()

    async def body():
        client = await connected(path)
        try:
            started = time.monotonic()
            with pytest.raises(AgentError) as info:
                await client.check(timeout_s=10)
            assert not isinstance(info.value, AgentTimeoutError)
            assert time.monotonic() - started < 5
            with pytest.raises(AgentError):
                await client.check()
        finally:
            await client.close()

    try:
        run(body())
    finally:
        thread.join(timeout=5)
        listener.close()


def test_calls_are_spans_under_the_given_context(agent):
    _exporter.clear()
    tracer = trace.get_tracer("test")

    async def body():
        client = await connected(agent.path)
        try:
            with tracer.start_as_current_span("parent") as parent:
                ctx = trace.set_span_in_context(parent)
            await client.check(ctx=ctx)
            with pytest.raises(AgentError):
                await client.read_random(0, ctx=ctx)
        finally:
            await client.close()
        return parent

    parent = run(body())
    spans = {s.name: s for s in _exporter.get_finished_spans()}
    for name in ("agent.Check", "agent.ReadRandom"):
        span = spans[name]
        assert span.parent.span_id == parent.context.span_id
        assert span.context.trace_id == parent.context.trace_id
        assert span.attributes["subsystem"] == "agent"
    assert spans["agent.ReadRandom"].status.status_code == StatusCode.ERROR
    assert spans["agent.Check"].status.status_code != StatusCode.ERROR


def test_process_output_waits_for_its_reader_and_nothing_is_dropped(short_dir):
    # A guest writing far more output than the client queues: the client stops reading the
    # socket (so the guest's writes block) instead of dropping; the loss comes after the data.
    from factory.agent import client as client_module
    from protocols.agent import agent_pb2
    from protocols.agent.framing import encode_frame

    path = os.path.join(short_dir, "chatty.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    count = client_module.MAX_QUEUED_EVENTS * 4
    chunk = b"x" * 65536

    def frame(i: int) -> bytes:
        message = agent_pb2.GuestMessage()
        message.event.process_output.exec_id = "p1"
        message.event.process_output.data = i.to_bytes(4, "big") + chunk
        return encode_frame(message.SerializeToString())

    def guest_side() -> None:
        conn, _ = listener.accept()
        with conn:
            for i in range(count):
                conn.sendall(frame(i))

    writer = threading.Thread(target=guest_side, daemon=True)
    writer.start()

    async def body():
        client = await connected(path)
        try:
            deadline = time.monotonic() + 10
            while not client.events.full():
                assert time.monotonic() < deadline, "the client's queue never filled"
                await asyncio.sleep(0.01)
            assert writer.is_alive()  # blocked in sendall: the backpressure reached the writer
            for i in range(count):
                event = await asyncio.wait_for(client.next_event(), 10)
                assert event.process_output.data[:4] == i.to_bytes(4, "big")
            writer.join(10)
            for _ in range(2):  # the loss, after every event, and for every later reader
                with pytest.raises(AgentError, match="closed"):
                    await asyncio.wait_for(client.next_event(), 10)
        finally:
            await client.close()
            listener.close()

    run(body())
