"""The narrow interface every factory strategy implements (upstream's FactoryBase).

Validation, the compatibility check and hotplug happen once, in
factory.factory.Factory; a strategy only produces paused VMs.
"""
from __future__ import annotations

import abc
from typing import Any

from opentelemetry.context import Context

from factory.config import VMConfig
from factory.vm import VM


class FactoryBase(abc.ABC):
    @abc.abstractmethod
    def config(self) -> VMConfig:
        """The base config this strategy's VMs are made from."""

    @abc.abstractmethod
    async def get_base_vm(self, config: VMConfig, ctx: Context | None = None) -> VM:
        """A paused VM."""

    @abc.abstractmethod
    async def close(self, ctx: Context | None = None) -> None:
        """Releases what the strategy holds (cached VMs, the template)."""

    def status(self) -> list[dict[str, int]]:
        """GrpcVMStatus-like entries for the ready VMs held; none unless it holds some.

        Upstream panics here for every strategy but the cache.
        """
        return []

    def details(self) -> dict[str, Any]:
        """More than status(), for `factory status --json`."""
        return {"strategy": type(self).__name__}
