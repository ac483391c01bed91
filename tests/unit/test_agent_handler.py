"""guest/agent/handler.py against a fake /proc and /sys tree (no VM)."""
import os
import time

import pytest

from guest.agent import AGENT_VERSION
from guest.agent.fakeroot import BOOT_ID, FakeGuest, can_reseed_host_crng
from guest.agent.handler import MAX_READ_RANDOM_BYTES, AgentHandler
from guest.agent.uevent import Uevent, parse_uevent
from protocols.agent import agent_pb2
from protocols.agent.framing import PROTOCOL_VERSION, OversizedFrame


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def guest(tmp_path):
    return FakeGuest(str(tmp_path))


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def settime_calls():
    return []


@pytest.fixture
def handler(guest, clock, settime_calls):
    return AgentHandler(guest.root, set_realtime_ns=settime_calls.append, monotonic=clock, online_wait_timeout_s=5.0)


def ask(handler, request_id=7, **kind):
    request = agent_pb2.Request(id=request_id, **kind)
    messages = handler.handle_frame(request.SerializeToString())
    assert len(messages) == 1, messages
    assert messages[0].WhichOneof("kind") == "response"
    return messages[0].response


def test_check_reports_versions(handler):
    response = ask(handler, check=agent_pb2.CheckRequest())
    assert response.id == 7 and response.error == ""
    assert response.check.agent_version == AGENT_VERSION
    assert response.check.protocol_version == PROTOCOL_VERSION


def test_guest_details(handler, guest):
    guest.add_cpu(1, online=True)
    guest.add_cpu(2, online=False)
    before = time.time_ns()
    details = ask(handler, get_guest_details=agent_pb2.GetGuestDetailsRequest()).get_guest_details
    after = time.time_ns()
    assert details.boot_id == BOOT_ID
    assert details.online_cpus == 2
    assert details.mem_total_kib == 500_000
    assert details.kernel_release == os.uname().release
    assert details.uptime_seconds > 0
    assert before <= details.wall_clock_sec * 10**9 + details.wall_clock_nsec <= after


def test_read_random_returns_fresh_bytes(handler):
    first = ask(handler, read_random=agent_pb2.ReadRandomRequest(length=32)).read_random.data
    second = ask(handler, read_random=agent_pb2.ReadRandomRequest(length=32)).read_random.data
    assert len(first) == len(second) == 32 and first != second


@pytest.mark.parametrize("length", [0, MAX_READ_RANDOM_BYTES + 1])
def test_read_random_bounds(handler, length):
    response = ask(handler, read_random=agent_pb2.ReadRandomRequest(length=length))
    assert f"length={length}" in response.error
    assert response.WhichOneof("kind") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="RNDRESEEDCRNG needs CAP_SYS_ADMIN")
@pytest.mark.skipif(not can_reseed_host_crng(),
                    reason="RNDRESEEDCRNG needs CAP_SYS_ADMIN, which Bazel's sandbox drops; "
                           "the integration tests reseed real guests")
def test_reseed_random_dev(handler):
    response = ask(handler, reseed_random_dev=agent_pb2.ReseedRandomDevRequest(data=os.urandom(64)))
    assert response.error == ""
    assert response.WhichOneof("kind") == "reseed_random_dev"


def test_reseed_refuses_empty_data(handler):
    response = ask(handler, reseed_random_dev=agent_pb2.ReseedRandomDevRequest())
    assert "data is empty" in response.error


def test_reseed_on_a_device_without_the_ioctl_is_an_error(guest, tmp_path):
    # A regular file stands in for a device that is not the kernel RNG.
    not_rng = tmp_path / "not-urandom"
    not_rng.write_bytes(b"")
    handler = AgentHandler(guest.root._replace(urandom=str(not_rng)))
    response = ask(handler, reseed_random_dev=agent_pb2.ReseedRandomDevRequest(data=b"x" * 8))
    assert "RNDRESEEDCRNG" in response.error and str(not_rng) in response.error


def test_set_guest_date_time_passes_nanoseconds(handler, settime_calls):
    response = ask(handler, set_guest_date_time=agent_pb2.SetGuestDateTimeRequest(sec=1_700_000_000, usec=250_001))
    assert response.error == ""
    assert settime_calls == [1_700_000_000_250_001_000]


@pytest.mark.parametrize(
    "sec,usec,message", [(0, 0, "sec=0"), (-5, 0, "sec=-5"), (1, 1_000_000, "usec=1000000"), (1, -1, "usec=-1")]
)
def test_set_guest_date_time_validates(handler, settime_calls, sec, usec, message):
    response = ask(handler, set_guest_date_time=agent_pb2.SetGuestDateTimeRequest(sec=sec, usec=usec))
    assert message in response.error
    assert settime_calls == []


@pytest.mark.skipif(os.geteuid() != 0 or not can_reseed_host_crng(),
                    reason="RNDRESEEDCRNG needs CAP_SYS_ADMIN, which Bazel's sandbox drops; "
                           "the integration tests hand off real guests")
def test_handoff_reseeds_sets_the_clock_and_answers_like_check(handler, settime_calls):
    response = ask(handler, handoff=agent_pb2.HandoffRequest(data=os.urandom(64), sec=1_700_000_000, usec=7))
    assert response.error == ""
    assert response.handoff.agent_version == AGENT_VERSION
    assert response.handoff.protocol_version == PROTOCOL_VERSION
    assert settime_calls == [1_700_000_000_000_007_000]


def test_handoff_without_entropy_is_refused_before_touching_the_clock(handler, settime_calls):
    response = ask(handler, handoff=agent_pb2.HandoffRequest(sec=1_700_000_000))
    assert "handoff: data is empty" in response.error
    assert response.WhichOneof("kind") is None
    assert settime_calls == []


def test_set_guest_date_time_reports_clock_errors(guest):
    def refuse(ns):
        raise PermissionError(1, "Operation not permitted")

    handler = AgentHandler(guest.root, set_realtime_ns=refuse)
    response = ask(handler, set_guest_date_time=agent_pb2.SetGuestDateTimeRequest(sec=1_700_000_000))
    assert "Operation not permitted" in response.error


def test_online_cpu_mem_onlines_cpus_and_memory(handler, guest):
    guest.add_cpu(1)
    guest.add_cpu(2)
    guest.add_memory_blocks([0, 1], online=True)
    guest.add_memory_blocks([8, 9])
    reply = ask(handler, online_cpu_mem=agent_pb2.OnlineCPUMemRequest()).online_cpu_mem
    assert (reply.onlined_cpus, reply.onlined_memory_blocks, reply.online_cpus) == (2, 2, 3)
    assert guest.cpu_online(1) and guest.cpu_online(2)
    assert guest.memory_state(8) == guest.memory_state(9) == "online"


def test_online_cpu_mem_cpu_only_leaves_memory(handler, guest):
    guest.add_cpu(1)
    guest.add_memory_blocks([8])
    reply = ask(handler, online_cpu_mem=agent_pb2.OnlineCPUMemRequest(cpu_only=True)).online_cpu_mem
    assert (reply.onlined_cpus, reply.onlined_memory_blocks) == (1, 0)
    assert guest.memory_state(8) == "offline"


def test_online_cpu_mem_wait_answers_when_the_cpu_arrives(handler, guest, clock):
    request = agent_pb2.Request(id=9, online_cpu_mem=agent_pb2.OnlineCPUMemRequest(wait=True, nb_cpus=2))
    assert handler.handle_frame(request.SerializeToString()) == []
    assert 0 < handler.seconds_until_tick() <= 0.05
    clock.now += 1
    assert handler.tick() == []
    guest.add_cpu(1)  # the hot-plugged CPU shows up, offline
    clock.now += 0.05
    [message] = handler.tick()
    assert message.response.id == 9 and message.response.error == ""
    assert message.response.online_cpu_mem.online_cpus == 2
    assert message.response.online_cpu_mem.onlined_cpus == 1
    assert handler.seconds_until_tick() is None


def test_online_cpu_mem_wait_is_bounded(handler, clock):
    request = agent_pb2.Request(id=3, online_cpu_mem=agent_pb2.OnlineCPUMemRequest(wait=True, nb_cpus=3))
    assert handler.handle_frame(request.SerializeToString()) == []
    clock.now += 5.0
    [message] = handler.tick()
    assert message.response.id == 3
    assert "1 of nb_cpus=3 CPUs online (present: [0]) after 5 s" in message.response.error


def test_online_cpu_mem_waits_for_memory_after_the_cpus(handler, guest, clock):
    # The CPU is already up; the DIMM's blocks appear later (ACPI events are handled in order).
    guest.add_cpu(1, online=True)
    guest.add_memory_blocks([0, 1, 2, 3], online=True)
    request = agent_pb2.Request(
        id=5, online_cpu_mem=agent_pb2.OnlineCPUMemRequest(wait=True, nb_cpus=2, memory_mib=768)
    )
    assert handler.handle_frame(request.SerializeToString()) == []
    clock.now += 1
    assert handler.tick() == []
    guest.add_memory_blocks([32, 33])
    clock.now += 0.05
    [message] = handler.tick()
    assert message.response.error == ""
    reply = message.response.online_cpu_mem
    assert (reply.online_memory_mib, reply.onlined_memory_blocks) == (768, 2)
    assert guest.memory_state(32) == guest.memory_state(33) == "online"


def test_online_cpu_mem_memory_wait_names_what_stayed_offline(handler, guest, clock):
    guest.add_memory_blocks([0, 1, 2, 3], online=True)
    request = agent_pb2.Request(id=6, online_cpu_mem=agent_pb2.OnlineCPUMemRequest(wait=True, memory_mib=768))
    assert handler.handle_frame(request.SerializeToString()) == []
    guest.add_memory_blocks([32])  # one of the two blocks arrives and is onlined
    clock.now += 5.0
    [message] = handler.tick()
    expected = "640 of memory_mib=768 MiB online (offline blocks: [], block size 128 MiB) after 5 s"
    assert expected in message.response.error


def test_online_cpu_mem_refuses_more_cpus_than_possible(handler):
    response = ask(handler, online_cpu_mem=agent_pb2.OnlineCPUMemRequest(wait=True, nb_cpus=5))
    assert "nb_cpus=5" in response.error and "4 CPUs" in response.error


def test_online_cpu_mem_without_wait_answers_at_once(handler):
    reply = ask(handler, online_cpu_mem=agent_pb2.OnlineCPUMemRequest(nb_cpus=4)).online_cpu_mem
    assert reply.online_cpus == 1


def test_cancel_pending_drops_waits(handler):
    request = agent_pb2.Request(id=3, online_cpu_mem=agent_pb2.OnlineCPUMemRequest(wait=True, nb_cpus=2))
    handler.handle_frame(request.SerializeToString())
    assert handler.cancel_pending() == 1
    assert handler.tick() == [] and handler.seconds_until_tick() is None


def test_malformed_frame_gets_error_with_id_zero(handler):
    [message] = handler.handle_frame(b"\xff\xff\xff")
    assert message.response.id == 0
    assert "undecodable request frame of 3 bytes" in message.response.error


def test_oversized_frame_gets_error_with_id_zero(handler):
    [message] = handler.handle_frame(OversizedFrame(5 << 20))
    assert message.response.id == 0
    assert str(5 << 20) in message.response.error


def test_unknown_request_names_protocol_version(handler):
    # A newer host's request (field 100 unknown to this agent) decodes with no kind set.
    future = agent_pb2.Request(id=11).SerializeToString() + bytes([0xA2, 0x06, 0x00])
    [message] = handler.handle_frame(future)
    assert message.response.id == 11
    assert f"protocol version {PROTOCOL_VERSION}" in message.response.error


def test_handler_survives_a_crashing_request(guest, monkeypatch):
    handler = AgentHandler(guest.root)

    def broken(self, request_id, request):
        raise KeyError("boom")

    monkeypatch.setattr(AgentHandler, "_handle_check", broken)
    response = ask(handler, check=agent_pb2.CheckRequest())
    assert "internal agent error: KeyError" in response.error
    # ...and keeps serving.
    assert ask(handler, read_random=agent_pb2.ReadRandomRequest(length=1)).error == ""


def test_startup_announces_and_onlines(handler, guest):
    guest.add_cpu(1)
    [message] = handler.startup_messages()
    started = message.event.agent_started
    assert ((started.agent_version, started.protocol_version, started.boot_id)
            == (AGENT_VERSION, PROTOCOL_VERSION, BOOT_ID))
    assert guest.cpu_online(1)


def _uevent(action, devpath, subsystem):
    raw = f"{action}@{devpath}\0ACTION={action}\0DEVPATH={devpath}\0SUBSYSTEM={subsystem}\0SEQNUM=1234\0"
    return parse_uevent(raw.encode())


def test_parse_uevent():
    event = _uevent("add", "/devices/system/cpu/cpu3", "cpu")
    assert event == Uevent("add", "/devices/system/cpu/cpu3", "cpu", event.env)
    assert event.env["SEQNUM"] == "1234"
    assert parse_uevent(b"libudev\0\xfe\xed") is None
    assert parse_uevent(b"add@/x\0SUBSYSTEM=cpu\0") is None  # no ACTION


def test_add_uevents_online_the_named_devices(handler, guest):
    guest.add_cpu(1)
    guest.add_cpu(2)
    guest.add_memory_blocks([8])
    events = [
        _uevent("add", "/devices/system/cpu/cpu1", "cpu"),
        _uevent("add", "/devices/system/memory/memory8", "memory"),
        _uevent("remove", "/devices/system/cpu/cpu2", "cpu"),
        _uevent("add", "/devices/pci0000:00/0000:00:03.0", "pci"),
    ]
    [message] = handler.handle_uevents(events)
    onlined = message.event.cpu_mem_onlined
    assert list(onlined.cpus) == [1] and list(onlined.memory_blocks) == [8]
    assert onlined.online_cpus == 2 and onlined.mem_total_kib == 500_000
    assert not guest.cpu_online(2)  # not named by an "add": left alone


def test_irrelevant_uevents_do_nothing(handler):
    assert handler.handle_uevents([_uevent("change", "/devices/virtual/tty/tty1", "tty")]) == []


def test_rescan_after_lost_uevents_onlines_everything(handler, guest):
    guest.add_cpu(3)
    [message] = handler.handle_uevents([], rescan=True)
    assert list(message.event.cpu_mem_onlined.cpus) == [3]


def test_uevent_completes_a_pending_wait(handler, guest):
    request = agent_pb2.Request(id=4, online_cpu_mem=agent_pb2.OnlineCPUMemRequest(wait=True, nb_cpus=2))
    assert handler.handle_frame(request.SerializeToString()) == []
    guest.add_cpu(1)
    messages = handler.handle_uevents([_uevent("add", "/devices/system/cpu/cpu1", "cpu")])
    kinds = sorted(m.WhichOneof("kind") for m in messages)
    assert kinds == ["event", "response"]
    [response] = [m.response for m in messages if m.WhichOneof("kind") == "response"]
    assert response.id == 4 and response.online_cpu_mem.online_cpus == 2


def test_uevent_socket_opens_and_is_empty():
    from guest.agent.uevent import UeventSocket

    sock = UeventSocket()
    try:
        assert sock.fileno() >= 0
        assert isinstance(sock.receive_all(), list)
    finally:
        sock.close()
