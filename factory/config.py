"""VM configuration: hypervisor, agent and VM config, validation with defaults, stable JSON.

`valid()` never mutates: it returns a copy with defaults filled in, or raises
ConfigError naming the field, the value and what would be accepted.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, TypeVar

from factory import assets
from factory.errors import ConfigError

# The hypervisor.accelerator settings; named here so the config layer needs nothing from the driver.
ACCELERATORS = ("auto", "kvm", "tcg")

# Any of the config sections _build() makes from a dict.
_Section = TypeVar("_Section", "HypervisorConfig", "AgentConfig")

HYPERVISOR_TYPES = ("qemu",)
MACHINES = ("q35",)  # microvm has no ACPI CPU/DIMM hotplug, which the factory needs
SHARED_FS = ("virtio-9p", "none")

DEFAULT_QEMU = "/usr/bin/qemu-system-x86_64"
DEFAULT_VCPUS = 1
DEFAULT_MEMORY_MIB = 2048  # upstream's default_memory
DEFAULT_MEMORY_SLOTS = 10
# Guests need this much to boot the kernel, initramfs and the Python agent.
MIN_MEMORY_MIB = 256
# Refuse obviously absurd sizes before QEMU does, with a clearer message.
MAX_VCPUS_LIMIT = 288
MAX_MEMORY_MIB_LIMIT = 4 * 1024 * 1024


def _host_memory_mib() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


@dataclasses.dataclass(frozen=True)
class HypervisorConfig:
    qemu_path: str = DEFAULT_QEMU
    kernel_path: str = ""  # empty: the bootstrap's guest kernel
    initrd_path: str = ""  # empty: the initramfs built by //guest:initramfs
    kernel_params: str = ""  # appended to the driver's own
    machine: str = "q35"
    accelerator: str = "auto"
    num_vcpus: int = 0  # 0: DEFAULT_VCPUS
    memory_mib: int = 0  # 0: DEFAULT_MEMORY_MIB
    max_vcpus: int = 0  # 0: the host's CPU count
    memory_slots: int = 0  # 0: DEFAULT_MEMORY_SLOTS
    max_memory_mib: int = 0  # 0: the host's memory
    # Off: the handoff every clone gets before it runs anything (VM.resume_for_owner) reseeds the
    # CRNG already, and synchronously; VMGENID's reseed is asynchronous, so it never was the
    # guarantee. On, a clone's `cont` and handoff took ~6-7 ms longer under TCG (the guest handles
    # the ACPI notification first; 2 interleaved runs of 8 clones each on a quiet machine).
    vmgenid: bool = False
    shared_fs: str = "virtio-9p"
    debug: bool = False
    boot_to_be_template: bool = False
    boot_from_template: bool = False
    memory_path: str = ""
    devices_state_path: str = ""

    def valid(self) -> "HypervisorConfig":
        c = self
        if c.machine not in MACHINES:
            raise ConfigError(f"hypervisor machine {c.machine!r} is not supported; use one of {', '.join(MACHINES)}")
        if c.accelerator not in ACCELERATORS:
            raise ConfigError(f"hypervisor accelerator {c.accelerator!r} is not one of {', '.join(ACCELERATORS)}")
        if c.shared_fs not in SHARED_FS:
            raise ConfigError(f"hypervisor shared_fs {c.shared_fs!r} is not one of {', '.join(SHARED_FS)}")
        for name in ("num_vcpus", "memory_mib", "max_vcpus", "memory_slots", "max_memory_mib"):
            value = getattr(c, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"hypervisor {name} must be a non-negative integer, got {value!r}")
        if c.boot_to_be_template and c.boot_from_template:
            raise ConfigError("hypervisor config sets both boot_to_be_template and boot_from_template; "
                              "a VM is either the template or a clone")
        if (c.boot_to_be_template or c.boot_from_template) and not c.memory_path:
            raise ConfigError("hypervisor memory_path is empty; a template or a clone needs the template's memory file")
        if c.boot_from_template and not c.devices_state_path:
            raise ConfigError("hypervisor devices_state_path is empty; a clone needs the template's saved device state")
        max_vcpus = c.max_vcpus or os.cpu_count() or 1
        num_vcpus = c.num_vcpus or DEFAULT_VCPUS
        if max_vcpus > MAX_VCPUS_LIMIT:
            raise ConfigError(f"hypervisor max_vcpus {max_vcpus} is more than QEMU's q35 limit of {MAX_VCPUS_LIMIT}")
        if num_vcpus > max_vcpus:
            raise ConfigError(f"hypervisor num_vcpus {num_vcpus} is more than max_vcpus {max_vcpus}")
        memory = c.memory_mib or DEFAULT_MEMORY_MIB
        if memory < MIN_MEMORY_MIB:
            raise ConfigError(f"hypervisor memory_mib {memory} is below the {MIN_MEMORY_MIB} MiB "
                              "the guest needs to boot")
        max_memory = c.max_memory_mib or _host_memory_mib()
        if max_memory > MAX_MEMORY_MIB_LIMIT:
            raise ConfigError(f"hypervisor max_memory_mib {max_memory} is absurd (limit {MAX_MEMORY_MIB_LIMIT})")
        max_memory = max(max_memory, memory)
        return dataclasses.replace(
            c,
            kernel_path=c.kernel_path or assets.default_kernel_path(),
            initrd_path=c.initrd_path or assets.default_initrd_path(),
            num_vcpus=num_vcpus,
            memory_mib=memory,
            max_vcpus=max_vcpus,
            memory_slots=c.memory_slots or DEFAULT_MEMORY_SLOTS,
            max_memory_mib=max_memory,
        )

    def check_files(self) -> None:
        """Raises ConfigError naming the first boot file that is missing."""
        files = [("qemu_path", self.qemu_path)]
        if not self.boot_from_template:
            files += [("kernel_path", self.kernel_path), ("initrd_path", self.initrd_path)]
        else:
            files += [("memory_path", self.memory_path), ("devices_state_path", self.devices_state_path)]
        for name, path in files:
            if not os.path.isfile(path):
                raise ConfigError(f"hypervisor {name} {path!r} does not exist or is not a file")


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    dial_timeout_s: float = 30.0
    debug: bool = False
    trace: bool = False

    def valid(self) -> "AgentConfig":
        if not isinstance(self.dial_timeout_s, (int, float)) or not 0 < self.dial_timeout_s <= 600:
            raise ConfigError(f"agent dial_timeout_s must be in (0, 600] seconds, got {self.dial_timeout_s!r}")
        return self


@dataclasses.dataclass(frozen=True)
class VMConfig:
    hypervisor_type: str = "qemu"
    hypervisor: HypervisorConfig = dataclasses.field(default_factory=HypervisorConfig)
    agent: AgentConfig = dataclasses.field(default_factory=AgentConfig)

    def valid(self) -> "VMConfig":
        if self.hypervisor_type not in HYPERVISOR_TYPES:
            raise ConfigError(f"hypervisor type {self.hypervisor_type!r} is not supported; "
                              f"use one of {', '.join(HYPERVISOR_TYPES)}")
        return dataclasses.replace(self, hypervisor=self.hypervisor.valid(), agent=self.agent.valid())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> bytes:
        """Stable form (sorted keys, no spaces): it travels in GrpcVMConfig.Data."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VMConfig":
        try:
            return cls(
                hypervisor_type=data.get("hypervisor_type", "qemu"),
                hypervisor=_build(HypervisorConfig, data.get("hypervisor", {}), "hypervisor"),
                agent=_build(AgentConfig, data.get("agent", {}), "agent"),
            )
        except AttributeError as err:
            raise ConfigError(f"VM config is not a JSON object: {err}") from err

    @classmethod
    def from_json(cls, raw: bytes | str) -> "VMConfig":
        try:
            data = json.loads(raw)
        except ValueError as err:
            raise ConfigError(f"VM config is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"VM config JSON must be an object, got {type(data).__name__}")
        return cls.from_dict(data)


def _build(kind: type[_Section], data: dict[str, Any], section: str) -> _Section:
    fields = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"unknown {section} config key(s): {', '.join(unknown)}")
    return kind(**data)
