"""Running the VMCache server in production: metrics, health, pool status, templates on disk."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from factory import template_store
from factory.template import TemplateFactory
from tests.integration.vmcache_server import RUNTIME, SERVER, Server, stop_handed_out
from tests.integration.vmtest import base_config, wait_for, write_config

# Bounded waits for what the server does asynchronously (pool refill, health).
WAIT_S = 120.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _config_with(root: str, **factory_keys: str) -> str:
    path = write_config(root, template=True, cache=2)
    text = Path(path).read_text()
    extra = "".join(f'{key} = "{value}"\n' for key, value in factory_keys.items())
    Path(path).write_text(text.replace("[factory]\n", "[factory]\n" + extra))
    return path


def _scrape(port: int) -> dict[str, float]:
    """Every sample as "name{label=value,...}" → value; parsing checks the text format."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" in s.labels:
                continue
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples



def _health(sock: str) -> int:
    with grpc.insecure_channel(f"unix://{sock}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _get_base_vm(sock: str) -> bytes:
    with grpc.insecure_channel(f"unix://{sock}") as channel:
        call = channel.unary_unary("/cache.CacheService/GetBaseVM",
                                   request_serializer=empty_pb2.Empty.SerializeToString,
                                   response_deserializer=bytes)
        return call(empty_pb2.Empty(), timeout=WAIT_S)


def test_metrics_health_and_pool_status_follow_the_vms_handed_out_and_a_restart_restores_the_template(run_root):
    port = _free_port()
    store = os.path.join(run_root, "persist")
    config = _config_with(run_root, vm_cache_metrics_address=f"127.0.0.1:{port}", template_persist_path=store)
    server = Server(run_root, config)
    handed: list[bytes] = []
    try:
        server.wait_ready(2)
        assert "created by booting a VM" in server.output()
        assert wait_for("SERVING", lambda: _health(server.socket) == health_pb2.HealthCheckResponse.SERVING, WAIT_S)
        before = _scrape(port)
        assert before["kata_vmcache_pool_size"] == 2
        assert before["kata_vmcache_pool_ready_vms"] == 2
        assert before["kata_vmcache_vms_handed_out_total"] == 0
        assert before["kata_vmcache_vm_build_duration_seconds_count"] >= 2
        assert before["kata_vmcache_template_creation_duration_seconds{source=boot}"] > 0
        assert abs(before["kata_vmcache_start_time_seconds"] - time.time()) < 3600
        assert before["kata_vmcache_orphans_reaped_total"] == 0

        handed = [_get_base_vm(server.socket) for _ in range(2)]
        after = _scrape(port)
        assert after["kata_vmcache_vms_handed_out_total"] == 2
        assert after["kata_vmcache_get_base_vm_duration_seconds_count"] == 2
        assert after["kata_vmcache_get_base_vm_duration_seconds_sum"] > 0

        # The pool refills; the builds counter follows.
        refilled = wait_for("refill", lambda: (s := _scrape(port))["kata_vmcache_pool_ready_vms"] == 2 and s, WAIT_S)
        assert refilled["kata_vmcache_vm_build_duration_seconds_count"] >= before[
            "kata_vmcache_vm_build_duration_seconds_count"] + 2

        # Another process reads health and the pool through the server's socket.
        status = subprocess.run([RUNTIME, "--config", config, "--json", "factory", "status"],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        facts = json.loads(status.stdout)["vm_cache"]
        assert facts["health"] == "SERVING"
        pool = facts["pool"]
        assert pool["pid"] == server.proc.pid and pool["size"] == 2 and pool["vms_handed_out"] == 2
        assert [s["state"] for s in pool["slots"]] == ["READY", "READY"]
        assert pool["template"]["path"] == os.path.join(run_root, "template")

        # A second server given the same metrics address says which address is taken.
        other = os.path.join(run_root, "other")
        os.makedirs(other)
        clash = subprocess.run([SERVER, "--config", _config_with(other, vm_cache_metrics_address=f"127.0.0.1:{port}")],
                               capture_output=True, text=True, timeout=60)
        assert clash.returncode == 1
        assert f"metrics address 127.0.0.1:{port} is already in use" in clash.stderr
        assert "Traceback" not in clash.stderr
    finally:
        for raw in handed:
            stop_handed_out(raw)
        server.stop()

    # The stopped server removed its tmpfs template; the next one copies it back from disk.
    assert not os.path.exists(os.path.join(run_root, "template"))
    again = Server(run_root, config)
    try:
        again.wait_ready(2)
        assert f"restored from {store}" in again.output()
        assert _scrape(port)["kata_vmcache_template_creation_duration_seconds{source=disk}"] > 0
    finally:
        again.stop()


def test_a_template_removed_from_tmpfs_is_restored_from_disk_and_clones_work(run_root):
    tmpfs, store = os.path.join(run_root, "template"), os.path.join(run_root, "persist")
    run = os.path.join(run_root, "vm")
    config = base_config()

    async def scenario() -> None:
        created = await TemplateFactory.create(config, tmpfs, run, persist_path=store)
        assert not created.restored_from and not created.persist_error
        saved = os.stat(os.path.join(store, "memory"))
        assert saved.st_blocks * 512 < saved.st_size  # sparse: zero pages are not on disk
        await created.close()  # the tmpfs copy is gone, as after a reboot
        assert not os.path.exists(tmpfs)

        restored = await TemplateFactory.create(config, tmpfs, run, persist_path=store)
        try:
            assert restored.restored_from == store
            vm = await restored.get_base_vm(config)
            try:
                await vm.resume()
                await vm.agent.check()
            finally:
                await vm.stop()
        finally:
            await restored.close()

        # A configuration the saved template does not fit: booted anew, saved over it.
        changed = dataclasses.replace(config, hypervisor=dataclasses.replace(config.hypervisor, kernel_params="quiet"))
        assert template_store.differences(Path(store), {"kernel_params": "quiet"})
        recreated = await TemplateFactory.create(changed, tmpfs, run, persist_path=store)
        try:
            assert not recreated.restored_from
            assert json.loads(Path(store, "metadata.json").read_text())["kernel_params"] == "quiet"
        finally:
            await recreated.close()

    asyncio.run(scenario())
