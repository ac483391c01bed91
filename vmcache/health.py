"""Whether the pool can serve: the grpc.health.v1 answer and systemd readiness.

SERVING once the pool has been full, NOT_SERVING while any slot's builds
fail (the pool cannot replace what it hands out) and before it first fills.
The first time it is full, systemd gets READY=1 (Type=notify).
"""
from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health, health_pb2

from factory.cache import SlotSnapshot, SlotState
from hostos import sdnotify
from vmcache.service import SERVICE as CACHE_SERVICE

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

log = logging.getLogger(__name__)


class PoolHealth:
    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self.serving = False
        self.was_full = False
        self._pending: set[asyncio.Future[None]] = set()
        self._publish(NOT_SERVING)

    def update(self, slots: list[SlotSnapshot]) -> None:
        """Recomputes health from a pool snapshot; call after every build, failure and hand-out."""
        ready = sum(1 for s in slots if s.state is SlotState.READY)
        failing = [s for s in slots if s.state is SlotState.FAILING]
        if not self.was_full and ready == len(slots):
            self.was_full = True
            sdnotify.notify(f"READY=1\nSTATUS=pool full: {ready} VMs ready")
        serving = self.was_full and not failing
        if serving != self.serving:
            self.serving = serving
            self._publish(SERVING if serving else NOT_SERVING)
            if failing:
                log.warning("health: NOT_SERVING, slot %d fails: %s", failing[0].index, failing[0].last_error)
                sdnotify.notify(f"STATUS=cannot build VMs: {failing[0].last_error}")
            elif serving:
                sdnotify.notify(f"STATUS=serving, {ready} of {len(slots)} VMs ready")

    def _publish(self, status: int) -> None:
        # The servicer's setter is a coroutine; keep a reference until it ran.
        for name in (health.OVERALL_HEALTH, CACHE_SERVICE):
            future = asyncio.ensure_future(self.servicer.set(name, status))
            self._pending.add(future)
            future.add_done_callback(self._pending.discard)

    async def shutdown(self) -> None:
        sdnotify.notify("STOPPING=1")
        await self.servicer.enter_graceful_shutdown()
