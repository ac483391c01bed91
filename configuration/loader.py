"""configuration.toml → RuntimeConfig: lookup order, strict schema, upstream checks.

Unknown keys and wrong types are errors naming the key, the value and the
file: a typo must not silently fall back to a default.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from factory.config import AgentConfig, HypervisorConfig, VMConfig
from factory.errors import ConfigError
from factory.factory import FactoryConfig, Mode
from factory.template import DEFAULT_TEMPLATE_PATH

DEFAULT_LOCATIONS = (
    "/etc/kata-containers/configuration.toml",
    "/usr/share/defaults/kata-containers/configuration.toml",
)
EMBEDDED = "<built-in configuration.toml>"
DEFAULT_VM_CACHE_ENDPOINT = "/var/run/kata-containers/cache.sock"
# More cached VMs than this is a typo, not a plan (each holds guest memory).
MAX_VM_CACHE_NUMBER = 64

# key → (type, HypervisorConfig field); bool is checked before int on purpose.
_HYPERVISOR_KEYS = {
    "path": (str, "qemu_path"), "kernel": (str, "kernel_path"), "initrd": (str, "initrd_path"),
    "kernel_params": (str, "kernel_params"), "machine_type": (str, "machine"),
    "accelerator": (str, "accelerator"), "default_vcpus": (int, "num_vcpus"),
    "default_memory": (int, "memory_mib"), "default_maxvcpus": (int, "max_vcpus"),
    "memory_slots": (int, "memory_slots"), "enable_vmgenid": (bool, "vmgenid"),
    "shared_fs": (str, "shared_fs"), "enable_debug": (bool, "debug"),
}
_AGENT_KEYS = {"dial_timeout": (float, "dial_timeout_s"), "debug": (bool, "debug"), "enable_tracing": (bool, "trace")}
_FACTORY_KEYS = {"enable_template": bool, "template_path": str, "vm_cache_number": int, "vm_cache_endpoint": str,
                 "template_persist_path": str, "vm_cache_metrics_address": str, "vm_cache_client_uids": list}
_RUNTIME_KEYS = {"vm_run_root": str, "enable_tracing": bool, "tracing_exporter": str, "otlp_endpoint": str,
                 "disable_guest_seccomp": bool}


@dataclasses.dataclass(frozen=True)
class TracingConfig:
    enabled: bool = False
    exporter: str = "console"
    otlp_endpoint: str = ""


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    path: str
    vm_config: VMConfig
    enable_template: bool = False
    template_path: str = DEFAULT_TEMPLATE_PATH
    vm_cache_number: int = 0
    vm_cache_endpoint: str = DEFAULT_VM_CACHE_ENDPOINT
    vm_run_root: str = "/run/vc/vm"
    tracing: TracingConfig = TracingConfig()
    template_persist_path: str = ""  # "": the template lives on tmpfs only
    vm_cache_metrics_address: str = ""  # "host:port" of the Prometheus endpoint; "": off
    # Users besides root and the server's own whose processes may take VMs (SO_PEERCRED).
    vm_cache_client_uids: tuple[int, ...] = ()
    # Upstream's key and default: config.json's seccomp profile is ignored (with a warning), not
    # applied in the guest; false refuses such a config (the guest cannot apply it).
    disable_guest_seccomp: bool = True

    def factory_config(self, mode: Mode | None = None) -> FactoryConfig:
        """The factory this configuration asks for; `mode` overrides its choice (the VMCache server
        asks for its pool, a sandbox whose server is down for the local fallback)."""
        if mode is None:
            mode = Mode.VMCACHE_CLIENT if self.vm_cache_number > 0 else self.local_mode()
        cache = self.vm_cache_number if mode is Mode.VMCACHE_POOL else 0
        return FactoryConfig(mode=mode, template=self.enable_template, template_path=self.template_path,
                             cache=cache, vm_cache_endpoint=self.vm_cache_endpoint,
                             vm_config=self.vm_config, run_root=self.vm_run_root,
                             template_persist_path=self.template_persist_path)


    def local_mode(self) -> Mode:
        """Where VMs come from without a VMCache server: the template, else a direct boot."""
        return Mode.TEMPLATE if self.enable_template else Mode.DIRECT


def find(explicit: str | None = None) -> tuple[str, str]:
    """(where, text) of the configuration to use."""
    if explicit:
        return explicit, _read(explicit, "--config")
    env = os.environ.get("KATA_CONF_FILE")
    if env:
        return env, _read(env, "KATA_CONF_FILE")
    for candidate in DEFAULT_LOCATIONS:
        if os.path.isfile(candidate):
            return candidate, _read(candidate, "default location")
    return EMBEDDED, resources.files(__package__).joinpath("configuration.toml").read_text()


def _read(path: str, how: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"cannot read configuration {path} (from {how}): {err.strerror}") from err


def load(explicit: str | None = None) -> RuntimeConfig:
    where, text = find(explicit)
    return parse(text, where)


def _typed(where: str, key: str, value: Any, kind: type) -> Any:
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise ConfigError(f"{where}: {key} = {value!r} must be a {kind.__name__}")
    return value


def _section(where: str, data: dict[str, Any], name: str, allowed: set[str]) -> dict[str, Any]:
    section = data.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: [{name}] must be a table, got {section!r}")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) in [{name}]: {', '.join(unknown)}")
    return section


def parse(text: str, where: str = EMBEDDED) -> RuntimeConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where}: not valid TOML: {err}") from err
    unknown = sorted(set(data) - {"hypervisor", "agent", "factory", "runtime"})
    if unknown:
        raise ConfigError(f"{where}: unknown section(s): {', '.join(unknown)}")
    hypervisors = _section(where, data, "hypervisor", {"qemu"})
    agents = _section(where, data, "agent", {"kata"})
    hv_raw = _section(where, hypervisors, "qemu", set(_HYPERVISOR_KEYS)) if hypervisors else {}
    agent_raw = _section(where, agents, "kata", set(_AGENT_KEYS)) if agents else {}
    factory_raw = _section(where, data, "factory", set(_FACTORY_KEYS))
    runtime_raw = _section(where, data, "runtime", set(_RUNTIME_KEYS))

    hv = {field: _typed(where, f"hypervisor.qemu.{key}", hv_raw[key], kind)
          for key, (kind, field) in _HYPERVISOR_KEYS.items() if key in hv_raw}
    agent = {field: _typed(where, f"agent.kata.{key}", agent_raw[key], kind)
             for key, (kind, field) in _AGENT_KEYS.items() if key in agent_raw}
    factory = {key: _typed(where, f"factory.{key}", factory_raw[key], kind)
               for key, kind in _FACTORY_KEYS.items() if key in factory_raw}
    runtime = {key: _typed(where, f"runtime.{key}", runtime_raw[key], kind)
               for key, kind in _RUNTIME_KEYS.items() if key in runtime_raw}

    vm_config = VMConfig(hypervisor=HypervisorConfig(**hv), agent=AgentConfig(**agent))
    try:
        vm_config = vm_config.valid()
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from err

    cache_number = factory.get("vm_cache_number", 0)
    if not 0 <= cache_number <= MAX_VM_CACHE_NUMBER:
        raise ConfigError(f"{where}: factory.vm_cache_number = {cache_number} must be between 0 and "
                          f"{MAX_VM_CACHE_NUMBER}")
    # Upstream checkFactoryConfig: templating needs an initrd (an image cannot be shared).
    if factory.get("enable_template") and not vm_config.hypervisor.initrd_path:
        raise ConfigError(f"{where}: Factory option enable_template requires an initrd image")
    for key in ("template_path", "vm_cache_endpoint", "template_persist_path"):
        # template_persist_path may be "": persistence off.
        if key in factory and not os.path.isabs(factory[key]) and (factory[key] or key != "template_persist_path"):
            raise ConfigError(f"{where}: factory.{key} = {factory[key]!r} must be an absolute path")
    if factory.get("vm_cache_metrics_address"):
        try:
            split_address(factory["vm_cache_metrics_address"])
        except ValueError as err:
            raise ConfigError(f"{where}: factory.vm_cache_metrics_address: {err}") from err
    client_uids = factory.get("vm_cache_client_uids", [])
    for uid in client_uids:
        if isinstance(uid, bool) or not isinstance(uid, int) or not 0 <= uid < 2**32 - 1:
            raise ConfigError(f"{where}: factory.vm_cache_client_uids has {uid!r}; list numeric user IDs "
                              "(0 to 4294967294), e.g. [1000]")
    exporter = runtime.get("tracing_exporter", "console")
    if exporter not in ("console", "otlp"):
        raise ConfigError(f"{where}: runtime.tracing_exporter = {exporter!r} must be console or otlp")
    return RuntimeConfig(
        path=where,
        vm_config=vm_config,
        enable_template=factory.get("enable_template", False),
        template_path=factory.get("template_path") or DEFAULT_TEMPLATE_PATH,
        vm_cache_number=cache_number,
        vm_cache_endpoint=factory.get("vm_cache_endpoint") or DEFAULT_VM_CACHE_ENDPOINT,
        vm_run_root=runtime.get("vm_run_root", "/run/vc/vm"),
        tracing=TracingConfig(runtime.get("enable_tracing", False), exporter, runtime.get("otlp_endpoint", "")),
        template_persist_path=factory.get("template_persist_path", ""),
        vm_cache_metrics_address=factory.get("vm_cache_metrics_address", ""),
        vm_cache_client_uids=tuple(client_uids),
        disable_guest_seccomp=runtime.get("disable_guest_seccomp", True),
    )


def split_address(address: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" → (host, port); raises ValueError saying what is wrong."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} must be host:port with a port from 1 to 65535, e.g. 127.0.0.1:9464")
    return host.strip("[]") or "0.0.0.0", int(port)
