"""Operating the VMCache server: metrics address errors, health from pool state,
systemd readiness, the configuration keys."""
import asyncio
import socket

import pytest
from grpc_health.v1 import health_pb2

from configuration import loader
from factory.cache import SlotSnapshot, SlotState
from factory.errors import ConfigError, TemplateError
from hostos import sdnotify
from vmcache.health import NOT_SERVING, SERVING, PoolHealth
from vmcache.metrics import Metrics, failure_reason


def _slot(index: int, state: SlotState, error: str = "") -> SlotSnapshot:
    return SlotSnapshot(index, state, "vm" if state is SlotState.READY else "", 0,
                        1 if state is SlotState.FAILING else 0, error)


def test_a_taken_metrics_port_is_a_config_error_naming_the_address():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"metrics address 127.0.0.1:{port} is already in use; set "
                                              "factory.vm_cache_metrics_address"):
            Metrics().serve("127.0.0.1", port)


def test_failure_reasons_are_error_classes_never_messages():
    assert failure_reason(TemplateError("boom /some/path")) == "TemplateError"
    assert failure_reason(RuntimeError("anything")) == "other"


@pytest.fixture
def notifications(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)

    def received() -> list[str]:
        messages = []
        while True:
            try:
                messages.append(listener.recv(4096).decode())
            except BlockingIOError:
                return messages
    yield received
    listener.close()


def test_sd_notify_is_a_no_op_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False


def test_health_serves_once_the_pool_is_full_and_not_while_builds_fail(notifications):
    async def scenario():
        health = PoolHealth()
        health.update([_slot(0, SlotState.READY), _slot(1, SlotState.BUILDING)])
        assert not health.serving and notifications() == []
        health.update([_slot(0, SlotState.READY), _slot(1, SlotState.READY)])
        assert health.serving
        assert notifications()[0].startswith("READY=1\n")
        health.update([_slot(0, SlotState.BUILDING), _slot(1, SlotState.READY)])  # a hand-out
        assert health.serving
        health.update([_slot(0, SlotState.FAILING, "qemu died"), _slot(1, SlotState.READY)])
        assert not health.serving
        assert notifications() == ["STATUS=cannot build VMs: qemu died"]
        await asyncio.sleep(0)  # the servicer's setters run
        reply = await health.servicer.Check(health_pb2.HealthCheckRequest(service="cache.CacheService"), None)
        assert reply.status == NOT_SERVING
        health.update([_slot(0, SlotState.READY), _slot(1, SlotState.READY)])
        await asyncio.sleep(0)
        assert (await health.servicer.Check(health_pb2.HealthCheckRequest(), None)).status == SERVING
        assert not any(m.startswith("READY=1") for m in notifications())  # READY once, not per refill
    asyncio.run(scenario())


def test_persist_path_and_metrics_address_come_from_the_factory_section():
    config = loader.parse('[factory]\ntemplate_persist_path = "/var/lib/kata/template"\n'
                          'vm_cache_metrics_address = "127.0.0.1:9464"\n')
    assert config.factory_config().template_persist_path == "/var/lib/kata/template"
    assert loader.split_address(config.vm_cache_metrics_address) == ("127.0.0.1", 9464)
    assert loader.split_address("[::1]:9464") == ("::1", 9464)
    off = loader.parse("")
    assert off.template_persist_path == "" and off.vm_cache_metrics_address == ""


@pytest.mark.parametrize("text,message", [
    ('vm_cache_metrics_address = "9464"', "'9464' must be host:port"),
    ('vm_cache_metrics_address = "localhost:99999"', "'localhost:99999' must be host:port with a port from 1"),
    ('template_persist_path = "relative"', "template_persist_path = 'relative' must be an absolute path"),
])
def test_bad_operations_keys_are_named(text, message):
    with pytest.raises(ConfigError, match=message):
        loader.parse(f"[factory]\n{text}\n", "x.toml")
