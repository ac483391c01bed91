"""A VMCache server run as users run it (its own process), for the integration tests."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time

import grpc
from google.protobuf import empty_pb2

from factory.vm import stop_recorded
from native import vmstate
from protocols.cache import cache_pb2, cache_pb2_grpc

SERVER = "vmcache/server"
RUNTIME = "runtime/kata-runtime"


def stop_handed_out(raw: bytes) -> None:
    """Stops a VM a test took with GetBaseVM (its GrpcVM bytes), as its new owner would."""
    fields = vmstate.decode_grpc_vm(raw)
    asyncio.run(stop_recorded(json.loads(fields.hypervisor)))


class Server:
    def __init__(self, root: str, config: str) -> None:
        self.socket = os.path.join(root, "cache.sock")
        self.log = open(os.path.join(root, "server.log"), "w+")
        self.proc = subprocess.Popen([SERVER, "--config", config], stdout=self.log, stderr=subprocess.STDOUT)

    def stub(self):
        channel = grpc.insecure_channel(f"unix://{self.socket}")
        return channel, cache_pb2_grpc.CacheServiceStub(channel)

    def wait_ready(self, vms: int, timeout: float = 120) -> cache_pb2.GrpcStatus:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.output()}"
            if os.path.exists(self.socket):
                channel, stub = self.stub()
                with channel:
                    try:
                        status = stub.Status(empty_pb2.Empty(), timeout=2)
                        if len(status.vmstatus) >= vms:
                            return status
                    except grpc.RpcError:
                        pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready with {vms} VMs: {self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
