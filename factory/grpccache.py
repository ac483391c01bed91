"""The grpccache strategy: VMs from a VMCache server over its Unix socket.

Config() is the server's base config (so get_vm's compatibility check
compares the server's VMs with the local request); GetBaseVM re-attaches the
paused VM the server hands over, then get_vm post-processes it as any other.
"""
from __future__ import annotations

import json
from typing import Any

import grpc
from google.protobuf import empty_pb2
from opentelemetry import propagate
from opentelemetry.context import Context

from factory import handover, ownership, tracing
from factory.base import FactoryBase
from factory.config import VMConfig
from factory.errors import ConfigError, FactoryError
from factory.hypervisor.qemu import QemuState
from factory.hypervisor.rundir import DEFAULT_RUN_ROOT
from factory.vm import VM
from native import vmstate
from protocols.cache import cache_pb2

# A local server answers Config in a millisecond; longer means it is not there.
CONFIG_TIMEOUT_S = 5.0
# The server may still be booting VMs (seconds under TCG) when asked.
GET_BASE_VM_TIMEOUT_S = 150.0

# GetBaseVM metadata naming the caller (pid, start time), so the server records
# it as the VM's owner before the reply leaves: a server killed after that
# leaves no VM in limbo between the two. The kind and container id the caller
# acts as come along, so the record is final and the caller need not rewrite it.
OWNER_PID_KEY = "kata-owner-pid"
OWNER_START_TIME_KEY = "kata-owner-start-time"
OWNER_KIND_KEY = "kata-owner-kind"
OWNER_CONTAINER_KEY = "kata-owner-container"

_TRACER = "kata_vmfactory.factory"


def _metadata(ctx: Context | None) -> tuple[tuple[str, str], ...]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return tuple(carrier.items())


def _claim_metadata() -> tuple[tuple[str, str], ...]:
    me = ownership.current()
    claim = ((OWNER_PID_KEY, str(me.pid)), (OWNER_START_TIME_KEY, str(me.start_time)), (OWNER_KIND_KEY, me.kind.value))
    return claim + (((OWNER_CONTAINER_KEY, me.container_id),) if me.container_id else ())


class GrpcCacheFactory(FactoryBase):
    def __init__(self, endpoint: str, channel: grpc.aio.Channel, config: VMConfig,
                 run_root: str = DEFAULT_RUN_ROOT) -> None:
        self.endpoint = endpoint
        self.run_root = run_root  # where handed-over VMs must live
        self._channel = channel
        self._config = config
        self._get_base_vm = channel.unary_unary(
            "/cache.CacheService/GetBaseVM", request_serializer=empty_pb2.Empty.SerializeToString,
            response_deserializer=vmstate.decode_grpc_vm)

    @classmethod
    async def connect(cls, endpoint: str, ctx: Context | None = None,
                      run_root: str = DEFAULT_RUN_ROOT) -> "GrpcCacheFactory":
        channel = grpc.aio.insecure_channel(f"unix://{endpoint}")
        try:
            config_call = channel.unary_unary("/cache.CacheService/Config",
                                              request_serializer=empty_pb2.Empty.SerializeToString,
                                              response_deserializer=cache_pb2.GrpcVMConfig.FromString)
            try:
                reply = await config_call(empty_pb2.Empty(), timeout=CONFIG_TIMEOUT_S, metadata=_metadata(ctx))
            except grpc.aio.AioRpcError as err:
                raise FactoryError(f'failed to connect "{endpoint}": {err.details() or err.code().name}') from err
            try:
                config = VMConfig.from_json(reply.Data)
            except ConfigError as err:
                raise FactoryError(f"failed to convert JSON to VMConfig: {err}") from err
        except BaseException:
            await channel.close()
            raise
        return cls(endpoint, channel, config, run_root)

    def config(self) -> VMConfig:
        return self._config

    async def get_base_vm(self, config: VMConfig, ctx: Context | None = None) -> VM:
        with tracing.span(_TRACER, "grpccache.GetBaseVM", ctx, subsystem="factory", endpoint=self.endpoint) as span_ctx:
            try:
                fields = await self._get_base_vm(empty_pb2.Empty(), timeout=GET_BASE_VM_TIMEOUT_S,
                                                 metadata=_metadata(span_ctx) + _claim_metadata())
            except grpc.aio.AioRpcError as err:
                raise FactoryError(f"failed to GetBaseVM from {self.endpoint}: "
                                   f"{err.details() or err.code().name}") from err
            try:
                state = QemuState.from_dict(json.loads(fields.hypervisor))
            except (ValueError, TypeError) as err:
                raise FactoryError(f"VMCache server sent an unreadable hypervisor state "
                                   f"for VM {fields.id!r}: {err}") from err
            handover.check_handed_vm(fields.id, state, self.run_root)
            return await VM.attach(self._config, state, fields.cpu, fields.memory, fields.cpu_delta, span_ctx)

    async def close(self, ctx: Context | None = None) -> None:
        await self._channel.close()

    def details(self) -> dict[str, Any]:
        return {"strategy": "grpccache", "endpoint": self.endpoint}
