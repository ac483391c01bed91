"""A fake hypervisor and agent for factory logic tests (no QEMU).

They stand in for factory.hypervisor.qemu.Qemu and factory.agent.client.AgentClient
and record what the factory asked of them.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

from factory.base import FactoryBase
from factory.config import HypervisorConfig, VMConfig
from factory.errors import AgentUnsupportedError
from factory.vm import VM

_ids = itertools.count(1)


class FakeQemu:
    def __init__(self, config: VMConfig) -> None:
        n = next(_ids)
        self.state = SimpleNamespace(id=f"vm-{n}", pid=10_000 + n, memory_mib=config.hypervisor.memory_mib)
        self.run = SimpleNamespace(console_log=Path("/nonexistent"), agent_socket=Path("/nonexistent"))
        self.config = config
        self.alive = True
        self.paused = False
        self.stopped = False
        self.calls: list[str] = []
        self.owners: list = []  # every owner put on record, in order
        self.prepared_owner_records = 0

    def is_alive(self) -> bool:
        return self.alive and not self.stopped

    def record_owner(self, owner) -> None:
        self.owners.append(owner)

    def prepare_owner_record(self) -> None:
        self.prepared_owner_records += 1

    async def pause(self, ctx=None):
        self.calls.append("pause")
        self.paused = True

    async def resume(self, ctx=None):
        self.calls.append("resume")
        self.paused = False

    async def stop(self, ctx=None):
        self.calls.append("stop")
        self.stopped = True

    async def disconnect(self):
        self.calls.append("disconnect")

    async def hotplug_cpus(self, count, ctx=None):
        self.calls.append(f"hotplug_cpus {count}")
        return count

    async def hotplug_memory(self, size_mib, ctx=None):
        self.calls.append(f"hotplug_memory {size_mib}")


class FakeAgent:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail_on: str | None = None
        self.predates_handoff = False  # an agent image from before the handoff request

    def _record(self, name):
        self.calls.append(name)
        if self.fail_on == name:
            raise RuntimeError(f"agent {name} failed")

    async def close(self):
        self.calls.append("close")

    async def check(self, timeout_s=None, ctx=None):
        self._record("check")

    async def reseed_random_dev(self, data, ctx=None):
        self._record("reseed")

    async def set_guest_date_time(self, sec, usec, ctx=None):
        self._record("set_time")

    async def handoff(self, data, sec, usec, timeout_s=None, ctx=None):
        self._record("handoff")
        if self.predates_handoff:
            raise AgentUnsupportedError("guest agent refused Handoff: unsupported request")

    async def mount_shared(self, tag, mount_point, timeout_s=None, ctx=None):
        self._record("mount_shared")

    async def online_cpu_mem(self, nb_cpus=0, cpu_only=False, wait=False, memory_mib=0, ctx=None):
        self._record(f"online {nb_cpus}")


def fake_vm(config: VMConfig) -> VM:
    hv = config.hypervisor
    return VM(config, FakeQemu(config), FakeAgent(), hv.num_vcpus, hv.memory_mib)


def install(monkeypatch) -> list[VM]:
    """Makes VM.new build fake VMs; returns the list of every VM it made."""
    made: list[VM] = []

    async def new(cls, config, run_root="/run/vc/vm", ctx=None, vm_id=None):
        vm = fake_vm(config)
        made.append(vm)
        return vm

    monkeypatch.setattr(VM, "new", classmethod(new))
    return made


def config(**hv) -> VMConfig:
    base = dict(kernel_path="/k", initrd_path="/i", max_vcpus=8, max_memory_mib=8192, memory_mib=512)
    base.update(hv)
    return VMConfig(hypervisor=HypervisorConfig(**base))


class FlakyBase(FactoryBase):
    """A strategy handing out fake VMs of its base size (as a template does), failing first `failures` times."""

    def __init__(self, failures: int = 0, base_config: VMConfig | None = None) -> None:
        self._config = base_config or config().valid()
        self.failures = failures
        self.built = []
        self.closed = False

    def config(self):
        return self._config

    async def get_base_vm(self, config, ctx=None):
        config = self._config  # like a template: the base size, whatever was asked
        if self.failures:
            self.failures -= 1
            raise RuntimeError("QEMU exploded")
        vm = fake_vm(config)
        await vm.pause()
        self.built.append(vm)
        return vm

    async def close(self, ctx=None):
        self.closed = True


class StatefulBase(FlakyBase):
    """FlakyBase whose VMs have a hypervisor state to encode (as GetBaseVM sends it)."""

    async def get_base_vm(self, config, ctx=None):
        vm = await super().get_base_vm(config, ctx)
        state = {"id": vm.id, "pid": vm.hypervisor.state.pid}
        vm.hypervisor.state.to_dict = lambda: state
        return vm
