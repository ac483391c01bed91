"""cache.CacheService on top of a Factory: Config, GetBaseVM, Status, Quit.

GetBaseVM returns pre-encoded GrpcVM bytes (native codec) through a raw
response serializer: the hot path builds no message objects.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import weakref
from typing import Any, Callable

import grpc
from google.protobuf import empty_pb2
from opentelemetry import propagate
from opentelemetry.context import Context

from factory import tracing
from factory.factory import Factory
from factory.grpccache import OWNER_CONTAINER_KEY, OWNER_KIND_KEY, OWNER_PID_KEY, OWNER_START_TIME_KEY
from factory.ownership import Owner, OwnerKind
from factory.vm import VM
from native import vmstate
from protocols.cache import cache_pb2

SERVICE = "cache.CacheService"
# Upstream: Quit answers at once and the server stops a second later.
QUIT_DELAY_S = 1.0

_TRACER = "kata_vmfactory.vmcache"
_TRACEPARENT = "traceparent"  # the W3C trace context header, as gRPC metadata
# What a client may take a VM as: for itself, or for a container's shim.
_CLAIMABLE_KINDS = frozenset({OwnerKind.DIRECT, OwnerKind.CONTAINER})
log = logging.getLogger(__name__)


# The servicer context of every handler here (raw bytes out for GetBaseVM, messages otherwise).
_Context = grpc.aio.ServicerContext[Any, Any]


def grpc_vm_bytes(vm: VM) -> bytes:
    hypervisor = json.dumps(vm.hypervisor.state.to_dict(), sort_keys=True).encode()
    return vmstate.encode_grpc_vm(vm.id, hypervisor, 0, "", vm.cpu, vm.memory_mib, vm.cpu_delta)


class PreparedReplies:
    """GetBaseVM's reply for each VM waiting in the pool, encoded when it was parked rather than
    while a client waits. A parked VM's state does not change until it is handed out (the taker
    hot-plugs, never the pool); a VM dropped from the pool drops its entry with it."""

    def __init__(self) -> None:
        self._replies: weakref.WeakKeyDictionary[VM, bytes] = weakref.WeakKeyDictionary()

    def prepare(self, vm: VM) -> None:
        self._replies[vm] = grpc_vm_bytes(vm)

    def take(self, vm: VM) -> bytes:
        reply = self._replies.pop(vm, None)
        return reply if reply is not None else grpc_vm_bytes(vm)


def _trace_context(metadata: dict[str, str]) -> Context | None:
    # The client's span travels as W3C traceparent metadata; most calls carry none.
    return propagate.extract(metadata) if _TRACEPARENT in metadata else None


def _claimant(metadata: dict[str, str]) -> Owner | None:
    """The live caller a GetBaseVM names as the VM's next owner, if it names one."""
    try:
        # A client from before the kind was sent takes the VM as DIRECT, and records its own kind.
        kind = OwnerKind(metadata.get(OWNER_KIND_KEY, OwnerKind.DIRECT.value))
        owner = Owner(kind, int(metadata[OWNER_PID_KEY]), int(metadata[OWNER_START_TIME_KEY]),
                      metadata.get(OWNER_CONTAINER_KEY, ""))
    except (KeyError, ValueError):
        return None  # an upstream client: the VM stays on the server's record
    if kind not in _CLAIMABLE_KINDS:
        return None  # pool and template VMs are the server's own kinds, never a client's
    return owner if owner.is_alive() else None


class CacheService:
    def __init__(self, factory: Factory, on_quit: Callable[[], None],
                 on_handed_out: Callable[[float], None] = lambda seconds: None,
                 replies: PreparedReplies | None = None) -> None:
        self.factory = factory
        self._replies = replies if replies is not None else PreparedReplies()  # server.py fills it on_ready
        self._on_quit = on_quit
        self._on_handed_out = on_handed_out  # metrics: a VM the client received, and GetBaseVM's duration
        self._stopping: set[asyncio.Task[None]] = set()
        config = factory.config()
        # Computed once, as upstream: the base config does not change.
        self._config_reply = cache_pb2.GrpcVMConfig(
            Data=config.to_json(),
            AgentConfig=json.dumps(config.to_dict()["agent"], sort_keys=True).encode())

    async def config(self, request: empty_pb2.Empty, context: _Context) -> cache_pb2.GrpcVMConfig:
        return self._config_reply

    async def get_base_vm(self, request: empty_pb2.Empty, context: _Context) -> bytes:
        started = time.perf_counter()
        # Text values only: ours are, and a "-bin" key's bytes mean nothing here.
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        with tracing.span(_TRACER, "vmcache.GetBaseVM", _trace_context(metadata), subsystem="vmcache") as ctx:
            try:
                lease = await self.factory.lease_base_vm(ctx)
            except Exception as err:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"failed to GetBaseVM: {err}")
            vm = lease.vm
            try:
                # The receiver connects to QMP and the agent next: a QMP socket
                # serves one client, so let go of both first.
                await vm.disconnect()
                claimant = _claimant(metadata)
                if claimant is not None:
                    vm.hypervisor.record_owner(claimant)
                reply = self._replies.take(vm)
            except BaseException:
                await lease.give_back()
                raise

            seconds = time.perf_counter() - started

            def done(call: Any) -> None:  # the finished call: cancelled() tells a client that left
                # Ended after the reply has gone out: refilling starts a QEMU, which blocks the loop,
                # and the metrics (a pass over the pool's slots) need not delay the reply either.
                if not call.cancelled():
                    lease.commit()
                    self._on_handed_out(seconds)
                    return
                # A client that went away mid-call never receives the VM: stop it rather than
                # leave a QEMU nobody owns.
                log.warning("client left before receiving VM %s; stopping it", vm.id)
                task = asyncio.ensure_future(lease.give_back())
                self._stopping.add(task)  # owned until done: a dropped task may never run
                task.add_done_callback(self._stopping.discard)

            # types-grpcio declares a class here; grpc takes any callable of the call.
            context.add_done_callback(done)  # type: ignore[arg-type]
            return reply

    async def status(self, request: empty_pb2.Empty, context: _Context) -> cache_pb2.GrpcStatus:
        return cache_pb2.GrpcStatus(pid=os.getpid(), vmstatus=[
            cache_pb2.GrpcVMStatus(pid=s.pid, cpu=s.cpu, memory=s.memory) for s in self.factory.status()])

    async def quit(self, request: empty_pb2.Empty, context: _Context) -> empty_pb2.Empty:
        log.info("VM cache server will stop after %.0f second", QUIT_DELAY_S)
        asyncio.get_running_loop().call_later(QUIT_DELAY_S, self._on_quit)
        return empty_pb2.Empty()

    def handler(self) -> grpc.GenericRpcHandler:
        empty = empty_pb2.Empty.FromString
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Config": grpc.unary_unary_rpc_method_handler(
                self.config, request_deserializer=empty, response_serializer=cache_pb2.GrpcVMConfig.SerializeToString),
            "GetBaseVM": grpc.unary_unary_rpc_method_handler(
                self.get_base_vm, request_deserializer=empty, response_serializer=bytes),
            "Status": grpc.unary_unary_rpc_method_handler(
                self.status, request_deserializer=empty, response_serializer=cache_pb2.GrpcStatus.SerializeToString),
            "Quit": grpc.unary_unary_rpc_method_handler(
                self.quit, request_deserializer=empty, response_serializer=empty_pb2.Empty.SerializeToString),
        })
