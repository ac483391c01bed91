"""What an operator watches of one VMCache server: metrics, health, pool status.

The pool and the service report events here (a VM built, a build failed, a
VM handed out); this module turns them into Prometheus metrics, the
grpc.health.v1 status (and systemd readiness), and pool.PoolService.
"""
from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2_grpc

from configuration.loader import RuntimeConfig, split_address
from factory.cache import CacheFactory, SlotSnapshot
from factory.factory import Factory
from factory.template import TemplateFactory
from factory.vm import VM
from protocols.pool import pool_pb2_grpc
from vmcache.health import PoolHealth
from vmcache.metrics import Metrics, failure_reason
from vmcache.pool_service import PoolService


class Operations:
    def __init__(self, config: RuntimeConfig) -> None:
        """Starts the metrics endpoint when configured. :raise ConfigError: its address is taken."""
        self.metrics = Metrics()
        self.metrics.pool_size.set(config.vm_cache_number)
        if config.vm_cache_metrics_address:
            self.metrics.serve(*split_address(config.vm_cache_metrics_address))
        self.health = PoolHealth()
        self.handed_out = 0
        self._cache: CacheFactory | None = None
        self._template: TemplateFactory | None = None

    # ---- events (called on the event loop) --------------------------------

    def vm_built(self, slot: int, vm: VM, seconds: float) -> None:
        self.metrics.vm_build.observe(seconds)
        self._update()

    def vm_build_failed(self, slot: int, err: BaseException) -> None:
        self.metrics.vm_build_failures.labels(failure_reason(err)).inc()
        self._update()

    def vm_handed_out(self, seconds: float) -> None:
        self.handed_out += 1
        self.metrics.handed_out.inc()
        self.metrics.get_base_vm.observe(seconds)
        self._update()

    def orphans_reaped(self, count: int) -> None:
        """For start-up recovery: VMs of dead owners this server stopped."""
        self.metrics.orphans_reaped.inc(count)

    # ---- wiring -------------------------------------------------------------

    def attach(self, factory: Factory) -> None:
        """Reads the pool (and its template) of the factory the server serves."""
        if isinstance(factory.base, CacheFactory):
            self._cache = factory.base
            if isinstance(self._cache.base, TemplateFactory):
                self._template = self._cache.base
                source = "disk" if self._template.restored_from else "boot"
                self.metrics.template_creation.labels(source).set(self._template.creation_seconds)
        self.metrics.watch_ready(lambda: sum(1 for s in self.slots() if s.vm_id))
        self._update()

    def template_summary(self) -> str:
        """One line for the server's log: how the template came to be, and how long it took."""
        t = self._template
        if t is None:
            return "no template (VMs are booted directly)"
        how = f"restored from {t.restored_from}" if t.restored_from else "created by booting a VM"
        saved = f"; not saved: {t.persist_error}" if t.persist_error else ""
        return f"template in {t.path} {how} in {t.creation_seconds:.2f} s{saved}"

    def slots(self) -> list[SlotSnapshot]:
        return self._cache.slots() if self._cache else []

    def add_services(self, server: grpc.aio.Server) -> None:
        """grpc.health.v1.Health and pool.PoolService, beside cache.CacheService."""
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        pool_pb2_grpc.add_PoolServiceServicer_to_server(
            PoolService(self.slots, lambda: self.health.serving, self._template,
                        self.metrics.started_at, lambda: self.handed_out), server)

    def _update(self) -> None:
        if self._cache:
            self.health.update(self._cache.slots())

    async def close(self) -> None:
        await self.health.shutdown()
        self.metrics.close()
