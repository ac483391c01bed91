"""The VMCache server binary as users run it, for the benchmarks: a separate
process serving cache.CacheService on a Unix socket in the scratch directory.

It is stopped with SIGTERM (it then stops its cached VMs and removes its
template and socket); VMs it handed out belong to whoever received them:
stop_handed_out() stops those.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from factory.hypervisor.qemu import Qemu, QemuState
from native import vmstate
from protocols.cache import cache_pb2_grpc
from tests.bench.common import BENCH_DIAL_TIMEOUT_S, BENCH_MAX_VCPUS, BENCH_MEMORY_MIB
from tests.integration.vmtest import write_config

# Runfiles: this file is <runfiles>/<workspace>/tests/bench/; the server is a data dependency.
SERVER_BINARY = Path(__file__).parent.parent.parent / "vmcache" / "server"
# Template boot under TCG takes seconds; a few clones on top, slower on a loaded host.
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.005


def status_stub(channel: grpc.aio.Channel) -> cache_pb2_grpc.CacheServiceStub:
    return cache_pb2_grpc.CacheServiceStub(channel)


def get_base_vm_call(channel: grpc.aio.Channel):
    """GetBaseVM returning the raw GrpcVM bytes (decoded with the native codec)."""
    return channel.unary_unary("/cache.CacheService/GetBaseVM",
                               request_serializer=empty_pb2.Empty.SerializeToString,
                               response_deserializer=bytes)


async def stop_handed_out(raw: bytes) -> None:
    """Stops a VM the server handed out (nobody resumed or attached it)."""
    fields = vmstate.decode_grpc_vm(raw)
    await Qemu(QemuState.from_dict(json.loads(fields.hypervisor))).stop()


class VMCacheServer:
    def __init__(self, root: str, pool: int, initrd_path: str, template: bool = True) -> None:
        self.root = root
        self.pool = pool
        self.socket = os.path.join(root, "cache.sock")
        self.log_path = os.path.join(root, "server.log")
        # write_config's vm_run_root: a client must use the same one (handed-over VMs are checked).
        self.run_root = os.path.join(root, "vm")
        self.proc: asyncio.subprocess.Process | None = None
        self._channel: grpc.aio.Channel | None = None
        os.makedirs(root, exist_ok=True)
        self.config_path = write_config(root, template, pool, BENCH_MEMORY_MIB, BENCH_MAX_VCPUS,
                                        initrd_path, BENCH_DIAL_TIMEOUT_S)

    async def start(self) -> None:
        with open(self.log_path, "wb") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                str(SERVER_BINARY), "--config", self.config_path,
                stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=asyncio.subprocess.STDOUT)

    def output(self, lines: int = 20) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def ready_count(self) -> int:
        """How many VMs the server holds ready (Status), -1 while it does not answer."""
        if not os.path.exists(self.socket):
            return -1
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(f"unix://{self.socket}")
        try:
            status = await status_stub(self._channel).Status(empty_pb2.Empty(), timeout=2)
        except grpc.aio.AioRpcError:
            return -1
        return len(status.vmstatus)

    async def wait_full(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Waits until the pool is full; returns the seconds it took."""
        start = time.monotonic()
        while True:
            if self.proc is not None and self.proc.returncode is not None:
                raise RuntimeError(f"VMCache server exited with {self.proc.returncode}:\n{self.output()}")
            if await self.ready_count() >= self.pool:
                return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"VMCache server pool not full after {timeout_s:.0f} s:\n{self.output()}")
            await asyncio.sleep(POLL_S)

    async def stop(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), STOP_TIMEOUT_S)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
