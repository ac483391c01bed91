"""guest/agent/service.py: the agent's poll loop over a socketpair standing in for the port."""
import socket
import struct
import time

import pytest

from guest.agent.fakeroot import FakeGuest
from guest.agent.handler import AgentHandler
from guest.agent.service import RECHECK_MIN_S, AgentService
from protocols.agent import agent_pb2
from protocols.agent.framing import MAX_FRAME_BYTES, FrameDecoder, encode_frame


class Host:
    """The host end: sends requests, collects GuestMessages."""

    def __init__(self, sock: socket.socket, service: AgentService) -> None:
        self.sock = sock
        self.service = service
        self.decoder = FrameDecoder()
        sock.setblocking(False)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, request_id: int, **kind) -> bytes:
        return encode_frame(agent_pb2.Request(id=request_id, **kind).SerializeToString())

    def receive(self, count: int, timeout: float = 5.0):
        messages = []
        deadline = time.monotonic() + timeout
        while len(messages) < count:
            assert time.monotonic() < deadline, f"got {len(messages)} of {count} messages"
            self.service.run_once(max_wait_s=0.01)
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                continue
            for payload in self.decoder.feed(data):
                messages.append(agent_pb2.GuestMessage.FromString(payload))
        return messages


@pytest.fixture
def host(tmp_path):
    guest = FakeGuest(str(tmp_path))
    host_sock, guest_sock = socket.socketpair()
    guest_sock.setblocking(False)
    service = AgentService(guest_sock.fileno(), AgentHandler(guest.root))
    yield Host(host_sock, service)
    host_sock.close()
    guest_sock.close()


def test_requests_in_one_write_are_answered_in_order(host):
    host.send(
        host.request(1, check=agent_pb2.CheckRequest())
        + host.request(2, read_random=agent_pb2.ReadRandomRequest(length=16))
    )
    first, second = host.receive(2)
    assert first.response.id == 1 and first.response.check.protocol_version >= 1
    assert second.response.id == 2 and len(second.response.read_random.data) == 16


def test_a_request_split_across_writes(host):
    frame = host.request(5, check=agent_pb2.CheckRequest())
    for byte in frame:
        host.send(bytes([byte]))
        host.service.run_once(max_wait_s=0.01)
    [message] = host.receive(1)
    assert message.response.id == 5


def test_garbage_then_a_good_request(host):
    host.send(encode_frame(b"\xff\xff\xff\xff") + host.request(6, check=agent_pb2.CheckRequest()))
    bad, good = host.receive(2)
    assert bad.response.id == 0 and "undecodable" in bad.response.error
    assert good.response.id == 6 and good.response.error == ""


def test_oversized_frame_is_skipped_and_the_stream_stays_in_sync(host):
    oversized = struct.pack(">I", MAX_FRAME_BYTES + 1) + bytes(MAX_FRAME_BYTES + 1)
    data = oversized + host.request(8, check=agent_pb2.CheckRequest())
    view = memoryview(data)
    # Interleave sending with the service loop: the socket buffer is smaller than the frame.
    while view:
        try:
            sent = host.sock.send(view[:65536])
            view = view[sent:]
        except BlockingIOError:
            pass
        host.service.run_once(max_wait_s=0.01)
    bad, good = host.receive(2)
    assert bad.response.id == 0 and "MAX_FRAME_BYTES" in bad.response.error
    assert good.response.id == 8 and good.response.error == ""


def test_events_queued_before_the_host_reads_are_delivered(host):
    host.service.enqueue(host.service._handler.startup_messages())
    [message] = host.receive(1)
    assert message.event.agent_started.protocol_version >= 1


def test_host_gone_does_not_spin(host):
    host.send(host.request(9, check=agent_pb2.CheckRequest())[:3])  # half a frame, then gone
    host.service.run_once()
    host.sock.close()
    host.service.run_once()
    assert host.service.host_connected is False
    started = time.monotonic()
    for _ in range(6):
        host.service.run_once()
    # Backed-off re-probes: 0.04 + 0.08 + ... seconds, not a busy loop.
    assert time.monotonic() - started >= 6 * RECHECK_MIN_S


def test_stop_ends_run(host):
    host.service.stop()
    host.service.run()  # returns at once
