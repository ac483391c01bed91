"""The narrow interface every factory strategy implements (upstream's FactoryBase).

Validation, the compatibility check and hotplug happen once, in
factory.factory.Factory; a strategy only produces paused VMs.
"""
from __future__ import annotations

import abc
from typing import Any, Callable

from opentelemetry.context import Context

from factory.config import VMConfig
from factory.vm import VM, VMStatus


class Lease:
    """A VM taken from the pool and not yet accounted for: commit() once it is handed over,
    give_back() when it was not (it is stopped: a VM that left the pool is never reused). Either
    ends the lease and refills the slot; the first call counts, later ones do nothing."""

    def __init__(self, vm: VM, refill: Callable[[], None]) -> None:
        self.vm = vm
        self._refill: Callable[[], None] | None = refill

    def commit(self) -> None:
        self._end()

    async def give_back(self) -> None:
        if self._end():
            await self.vm.stop()

    def _end(self) -> bool:
        refill, self._refill = self._refill, None
        if refill is None:
            return False
        refill()
        return True


def _nothing() -> None:
    pass


class FactoryBase(abc.ABC):
    @abc.abstractmethod
    def config(self) -> VMConfig:
        """The base config this strategy's VMs are made from."""

    @abc.abstractmethod
    async def get_base_vm(self, config: VMConfig, ctx: Context | None = None) -> VM:
        """A paused VM."""

    async def take_base_vm(self, config: VMConfig, ctx: Context | None = None) -> Lease:
        """A paused VM for this process, on lease: commit it once it is set up for use. A pool
        refills only then, so the refill's QEMU start does not compete with the hand-out."""
        return Lease(await self.get_base_vm(config, ctx), _nothing)

    async def lease(self, ctx: Context | None = None) -> Lease:
        """A paused VM for another process to take over (VMCache's GetBaseVM): commit the lease
        once it is handed over, give it back if not. Only a pool has anything to refill."""
        return Lease(await self.get_base_vm(self.config(), ctx), _nothing)

    @abc.abstractmethod
    async def close(self, ctx: Context | None = None) -> None:
        """Releases what the strategy holds (cached VMs, the template)."""

    def status(self) -> list[VMStatus]:
        """GrpcVMStatus-like entries for the ready VMs held; none unless it holds some.

        Upstream panics here for every strategy but the cache.
        """
        return []

    def details(self) -> dict[str, Any]:
        """More than status(), for `factory status --json`."""
        return {"strategy": type(self).__name__}
