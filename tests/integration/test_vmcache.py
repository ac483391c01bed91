"""The VMCache server as users run it: a separate process, real gRPC on a Unix socket."""
from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf import empty_pb2

from factory.config import VMConfig
from factory.factory import FactoryConfig, Mode, new_factory
from factory.grpccache import GrpcCacheFactory
from hostos import process
from native import vmstate
from tests.integration.vmcache_server import RUNTIME, SERVER, Server, stop_handed_out
from tests.integration.vmtest import TEST_MEMORY_MIB, write_config


def _write_config(root: str, template: bool = True, cache: int = 2) -> str:
    return write_config(root, template, cache)


def _runtime(config: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RUNTIME, "--config", config, *args], capture_output=True, text=True, timeout=60)


def test_server_status_client_and_destroy(run_root):
    config = _write_config(run_root)
    server = Server(run_root, config)
    try:
        status = server.wait_ready(2)
        assert stat.S_IMODE(os.stat(server.socket).st_mode) == 0o600
        assert all(process.start_time(vm.pid) for vm in status.vmstatus)

        out = _runtime(config, "factory", "status").stdout.splitlines()
        assert out[0] == f"VM cache server pid = {server.proc.pid}"
        assert sorted(out[1:3]) == sorted(f"VM pid = {vm.pid} Cpu = 1 Memory = {TEST_MEMORY_MIB}MiB"
                                          for vm in status.vmstatus)
        assert out[3] == "vm factory is on"

        async def client():
            factory = await new_factory(FactoryConfig(mode=Mode.VMCACHE_CLIENT, vm_cache_endpoint=server.socket,
                                                      vm_config=VMConfig(), run_root=os.path.join(run_root, "vm")))
            assert isinstance(factory.base, GrpcCacheFactory)
            vm = await factory.get_vm(factory.config())
            try:
                await vm.agent.check()
                assert vm.hypervisor.state.pid in {s.pid for s in status.vmstatus}
            finally:
                await vm.stop()
                await factory.close()
        asyncio.run(client())
        server.wait_ready(2, timeout=60)  # the pool refilled

        assert _runtime(config, "factory", "destroy").stdout.strip() == "vm factory destroyed"
        server.proc.wait(30)
        assert not os.path.exists(server.socket)
        assert not os.path.ismount(os.path.join(run_root, "template"))
        assert not process.pids_mentioning(run_root + "/vm/")
    finally:
        server.stop()


def test_concurrent_clients_get_distinct_vms(run_root):
    server = Server(run_root, _write_config(run_root))
    handed: list[bytes] = []
    try:
        server.wait_ready(2)

        def get(_):
            channel = grpc.insecure_channel(f"unix://{server.socket}")
            call = channel.unary_unary("/cache.CacheService/GetBaseVM",
                                       request_serializer=empty_pb2.Empty.SerializeToString,
                                       response_deserializer=bytes)
            with channel:
                try:
                    return call(empty_pb2.Empty(), timeout=150)
                except grpc.RpcError as err:
                    return err

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(get, range(16)))
        handed = [r for r in results if isinstance(r, bytes)]
        errors = [r for r in results if not isinstance(r, bytes)]
        for err in errors:  # allowed, but must say why
            assert "failed to GetBaseVM" in err.details()
        ids = [vmstate.decode_grpc_vm(r).id for r in handed]
        pids = [json.loads(vmstate.decode_grpc_vm(r).hypervisor)["pid"] for r in handed]
        assert len(set(ids)) == len(ids) and len(set(pids)) == len(pids)
        assert len(handed) >= 2
    finally:
        for raw in handed:
            stop_handed_out(raw)
        server.stop()


def test_a_killed_servers_stale_socket_is_replaced(run_root):
    config = _write_config(run_root, template=False, cache=1)
    first = Server(run_root, config)
    first.wait_ready(1)
    first.proc.kill()
    first.proc.wait()
    first.log.close()
    assert os.path.exists(first.socket)  # stale: nobody listens

    second = Server(run_root, config)
    try:
        second.wait_ready(1)
        # A live server's socket is refused, not replaced.
        third = subprocess.run([SERVER, "--config", config], capture_output=True, text=True, timeout=60)
        assert third.returncode == 1 and "is in use by a running VMCache server" in third.stderr
    finally:
        second.stop()
    assert not os.path.exists(second.socket)
