"""Factory: builds a strategy from FactoryConfig and turns its paused VMs into
running VMs that fit the request (upstream's factory.GetVM, improved)."""
from __future__ import annotations

import dataclasses
import enum
import logging
from typing import Any, Callable

from opentelemetry.context import Context

from factory import tracing
from factory.base import FactoryBase, Lease
from factory.cache import CacheFactory
from factory.config import VMConfig
from factory.direct import DirectFactory
from factory.errors import ConfigError, FactoryError
from factory.hypervisor.rundir import DEFAULT_RUN_ROOT
from factory.template import DEFAULT_TEMPLATE_PATH, TemplateFactory
from factory.vm import VM, VMStatus

_TRACER = "kata_vmfactory.factory"
log = logging.getLogger(__name__)

# Fields a factory VM may differ in from the request: sizes are hot-plugged,
# template fields are the factory's business.
_IGNORED_HYPERVISOR_FIELDS: dict[str, Any] = dict(num_vcpus=0, memory_mib=0, boot_to_be_template=False,
                                                  boot_from_template=False, memory_path="", devices_state_path="")


class Mode(enum.Enum):
    """Where a factory's VMs come from; one setting instead of flags that combine."""
    DIRECT = "direct"  # boot each VM when asked
    TEMPLATE = "template"  # clone the template (made by the first user)
    CACHE = "cache"  # keep `cache` VMs ready in this process (clones or direct boots)
    VMCACHE_CLIENT = "vmcache-client"  # take VMs from a VMCache server over its socket
    VMCACHE_POOL = "vmcache-pool"  # the VMCache server's pool: a cache whose VMs wait disconnected


@dataclasses.dataclass(frozen=True)
class FactoryConfig:
    mode: Mode = Mode.DIRECT
    template: bool = False  # CACHE and VMCACHE_POOL: clone the template instead of booting
    template_path: str = DEFAULT_TEMPLATE_PATH
    cache: int = 0  # CACHE and VMCACHE_POOL: how many VMs to keep ready
    vm_cache_endpoint: str = "/var/run/kata-containers/cache.sock"
    vm_config: VMConfig = dataclasses.field(default_factory=VMConfig)
    run_root: str = DEFAULT_RUN_ROOT
    template_persist_path: str = ""  # "": the template lives on tmpfs only

    def __post_init__(self) -> None:
        pooled = self.mode in (Mode.CACHE, Mode.VMCACHE_POOL)
        if pooled != (self.cache > 0):
            raise ConfigError(f"factory mode {self.mode.value} with cache = {self.cache}: "
                              + ("a cache needs cache > 0" if pooled else "only cache and vmcache-pool keep VMs"))
        if self.mode is Mode.TEMPLATE and not self.template:
            object.__setattr__(self, "template", True)  # the mode says it
        if self.mode is Mode.DIRECT and self.template:
            raise ConfigError("factory mode direct boots every VM; use mode template to clone one")


def check_vm_config(base: VMConfig, request: VMConfig) -> None:
    """Raises ConfigError saying what differs when a base VM cannot serve `request`."""
    if base.hypervisor_type != request.hypervisor_type:
        raise ConfigError(f"hypervisor type does not match: {base.hypervisor_type} vs. {request.hypervisor_type}")
    a = dataclasses.replace(base.hypervisor, **_IGNORED_HYPERVISOR_FIELDS)
    b = dataclasses.replace(request.hypervisor, **_IGNORED_HYPERVISOR_FIELDS)
    differences = [f"{f.name}: base {getattr(a, f.name)!r}, request {getattr(b, f.name)!r}"
                   for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
    if base.agent != request.agent:
        differences.append(f"agent: base {base.agent}, request {request.agent}")
    if differences:
        raise ConfigError("hypervisor config does not match: " + "; ".join(differences))


class Factory:
    def __init__(self, base: FactoryBase, run_root: str = DEFAULT_RUN_ROOT) -> None:
        self.base = base
        self.run_root = run_root  # where fallback VMs live

    def config(self) -> VMConfig:
        return self.base.config()

    def status(self) -> list[VMStatus]:
        return self.base.status()

    async def get_base_vm(self, config: VMConfig, ctx: Context | None = None) -> VM:
        return await self.base.get_base_vm(config, ctx)

    async def lease_base_vm(self, ctx: Context | None = None) -> Lease:
        """A paused base VM to hand to another process (see FactoryBase.lease)."""
        return await self.base.lease(ctx)

    async def close(self, ctx: Context | None = None) -> None:
        await self.base.close(ctx)

    async def get_vm(self, request: VMConfig, ctx: Context | None = None) -> VM:
        """A running VM that fits `request`: resumed, reseeded, clock set, hot-plugged to size."""
        with tracing.span(_TRACER, "GetVM", ctx, subsystem="factory") as span_ctx:
            wanted = request.hypervisor  # before defaults: 0 means "no hotplug"
            config = request.valid()
            try:
                check_vm_config(self.base.config(), config)
                source = self.base
            except ConfigError as err:
                log.info("fallback to direct factory vm: %s", err)
                source = DirectFactory(config, self.run_root)
            # On lease: a pool refills once this VM is set up, not while it is (see take_base_vm).
            lease = await source.take_base_vm(config, span_ctx)
            if not lease.vm.hypervisor.is_alive():
                # Died between hand-out and now (killed, OOM): one more try.
                log.warning("base VM %s died before use; taking another", lease.vm.id)
                lease.commit()
                await lease.vm.stop(span_ctx)
                lease = await source.take_base_vm(config, span_ctx)
            vm = lease.vm
            try:
                # Upstream returns the fallback VM paused; every path resumes here.
                await vm.resume_for_owner(span_ctx)
                # Against the VM's own size, not the base config's: a direct
                # VM was booted at the requested size already (upstream adds
                # the difference again).
                online = False
                if wanted.num_vcpus and vm.cpu < wanted.num_vcpus:
                    await vm.add_cpus(wanted.num_vcpus - vm.cpu, span_ctx)
                    online = True
                if wanted.memory_mib and vm.memory_mib < wanted.memory_mib:
                    await vm.add_memory(wanted.memory_mib - vm.memory_mib, span_ctx)
                    online = True
                if online:
                    await vm.online_cpu_memory(span_ctx)
            except BaseException:
                log.info("clean up vm %s", vm.id)
                await vm.stop(span_ctx)
                raise
            finally:
                lease.commit()
            return vm


async def new_factory(config: FactoryConfig, fetch_only: bool = False, ctx: Context | None = None,
                      on_ready: Callable[[int, VM, float], None] | None = None,
                      on_failure: Callable[[int, BaseException], None] | None = None) -> Factory:
    """Chooses and builds the strategy (upstream NewFactory)."""
    with tracing.span(_TRACER, "NewFactory", ctx, subsystem="factory") as span_ctx:
        vm_config = config.vm_config.valid()
        if fetch_only and config.cache > 0:
            raise FactoryError("cache factory does not support fetch")
        if config.mode is Mode.VMCACHE_CLIENT:
            from factory.grpccache import GrpcCacheFactory  # the VMCache issue
            client = await GrpcCacheFactory.connect(config.vm_cache_endpoint, span_ctx, config.run_root)
            return Factory(client, config.run_root)
        base: FactoryBase
        if config.template:
            if fetch_only:
                base = TemplateFactory.fetch(vm_config, config.template_path, config.run_root)
            else:
                # A template that is there and fits is everyone's: the VMCache
                # server after a restart, sandboxes while it is down.
                base = await TemplateFactory.open_or_create(vm_config, config.template_path, config.run_root,
                                                            span_ctx,
                                                            persist_path=config.template_persist_path)
        else:
            base = DirectFactory(vm_config, config.run_root)
        if config.mode in (Mode.CACHE, Mode.VMCACHE_POOL):
            # The VMCache pool parks its VMs disconnected: another process connects next.
            base = CacheFactory(base, config.cache, on_ready=on_ready, on_failure=on_failure,
                                park_disconnected=config.mode is Mode.VMCACHE_POOL)
        return Factory(base, config.run_root)
