"""pool.PoolService: the pool's per-slot state and errors, for `factory status --json`.

Served beside cache.CacheService on the same socket; that one stays exactly
upstream's, so this is where everything upstream's GrpcStatus cannot carry goes.
"""
from __future__ import annotations

import os
from typing import Callable

import grpc

from factory.cache import SlotSnapshot, SlotState
from factory.template import TemplateFactory
from protocols.pool import pool_pb2

_STATES = {SlotState.BUILDING: pool_pb2.Slot.BUILDING, SlotState.READY: pool_pb2.Slot.READY,
           SlotState.FAILING: pool_pb2.Slot.FAILING}


class PoolService:
    """Registered with pool_pb2_grpc.add_PoolServiceServicer_to_server (it calls Status by name)."""

    def __init__(self, slots: Callable[[], list[SlotSnapshot]], serving: Callable[[], bool],
                 template: TemplateFactory | None, start_time: float, handed_out: Callable[[], int]) -> None:
        self._slots = slots
        self._serving = serving
        self._template = template
        self._start_time = start_time
        self._handed_out = handed_out

    async def Status(self, request: object, context: grpc.aio.ServicerContext[object, object]) -> pool_pb2.PoolStatus:
        slots = self._slots()
        reply = pool_pb2.PoolStatus(
            pid=os.getpid(), size=len(slots), ready=sum(1 for s in slots if s.state is SlotState.READY),
            serving=self._serving(), start_time_seconds=self._start_time, vms_handed_out=self._handed_out(),
            slots=[pool_pb2.Slot(index=s.index, state=_STATES[s.state], vm_id=s.vm_id, pid=s.pid,
                                 failures=s.failures, last_error=s.last_error) for s in slots])
        if self._template:
            t = self._template
            reply.template.CopyFrom(pool_pb2.Template(path=str(t.path), creation_seconds=t.creation_seconds,
                                                      restored_from=t.restored_from, persist_error=t.persist_error))
        return reply
