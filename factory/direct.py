"""The direct strategy: boot a new VM for every request."""
from __future__ import annotations

from opentelemetry.context import Context

from factory import tracing
from factory.base import FactoryBase
from factory.config import VMConfig
from factory.hypervisor.rundir import DEFAULT_RUN_ROOT
from factory.vm import VM


class DirectFactory(FactoryBase):
    def __init__(self, config: VMConfig, run_root: str = DEFAULT_RUN_ROOT) -> None:
        self._config = config
        self.run_root = run_root

    def config(self) -> VMConfig:
        return self._config

    async def get_base_vm(self, config: VMConfig, ctx: Context | None = None) -> VM:
        # Upstream boots the *requested* config, not the stored one.
        with tracing.span("kata_vmfactory.factory", "direct.GetBaseVM", ctx, subsystem="factory") as span_ctx:
            vm = await VM.new(config, self.run_root, span_ctx)
            try:
                await vm.pause(span_ctx)
            except BaseException:
                await vm.stop(span_ctx)
                raise
            return vm

    async def close(self, ctx: Context | None = None) -> None:
        pass
