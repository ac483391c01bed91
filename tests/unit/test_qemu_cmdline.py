"""The QEMU command line per launch mode, and config validation (no VM)."""
from pathlib import Path

import pytest

from factory.config import AgentConfig, HypervisorConfig, VMConfig
from factory.errors import ConfigError
from factory.hypervisor import cmdline
from factory.hypervisor.accelerator import Accelerator, choose
from factory.hypervisor.rundir import RunDir

TCG = Accelerator("tcg", "max", "test")


def _cfg(**kw) -> HypervisorConfig:
    return HypervisorConfig(kernel_path="/k", initrd_path="/i", max_vcpus=4, max_memory_mib=4096,
                            memory_mib=512, **kw).valid()


def _args(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


def test_direct_boot_has_kernel_and_ram_backend_and_no_incoming():
    cmd = cmdline.build(_cfg(), TCG, RunDir(Path("/r"), "v1"), "v1")
    assert _args(cmd, "-kernel") == ["/k"] and _args(cmd, "-initrd") == ["/i"]
    assert "-incoming" not in cmd
    assert _args(cmd, "-object") == ["memory-backend-ram,id=mem0,size=512M"]
    assert _args(cmd, "-m") == ["512M,slots=10,maxmem=4096M"]
    assert _args(cmd, "-smp") == ["1,maxcpus=4"]
    assert cmd[-1] == "-daemonize" and "-nographic" not in cmd


def test_template_maps_ram_shared_and_clone_private_without_kernel():
    template = cmdline.build(_cfg(boot_to_be_template=True, memory_path="/t/memory"), TCG, RunDir(Path("/r"), "t"), "t")
    clone = cmdline.build(_cfg(boot_from_template=True, memory_path="/t/memory", devices_state_path="/t/state"),
                          TCG, RunDir(Path("/r"), "t"), "t")
    assert _args(template, "-object") == ["memory-backend-file,id=mem0,size=512M,mem-path=/t/memory,share=on"]
    assert _args(clone, "-object") == ["memory-backend-file,id=mem0,size=512M,mem-path=/t/memory,share=off"]
    assert "-kernel" not in clone and "-append" not in clone
    assert _args(clone, "-incoming") == ["defer"]
    # A clone must carry exactly the template's devices: QEMU would not notice a difference.
    assert _args(template, "-device") == _args(clone, "-device")


def test_kernel_params_are_appended_to_ours():
    cmd = cmdline.build(_cfg(kernel_params="foo=1"), TCG, RunDir(Path("/r"), "v"), "v")
    assert _args(cmd, "-append") == [cmdline.BASE_KERNEL_PARAMS + " foo=1"]


@pytest.mark.parametrize("change,message", [
    ({"machine": "pc"}, "machine 'pc' is not supported"),
    ({"accelerator": "hvf"}, "accelerator 'hvf' is not one of auto, kvm, tcg"),
    ({"num_vcpus": 8}, "num_vcpus 8 is more than max_vcpus 4"),
    ({"memory_mib": 64}, "memory_mib 64 is below"),
    ({"memory_slots": -1}, "memory_slots must be a non-negative integer, got -1"),
    ({"boot_to_be_template": True, "boot_from_template": True, "memory_path": "/m"},
     "both boot_to_be_template and boot_from_template"),
    ({"boot_from_template": True}, "memory_path is empty"),
    ({"boot_from_template": True, "memory_path": "/m"}, "devices_state_path is empty"),
])
def test_invalid_hypervisor_config_names_field_and_value(change, message):
    base = dict(kernel_path="/k", initrd_path="/i", max_vcpus=4)
    with pytest.raises(ConfigError, match=message):
        HypervisorConfig(**{**base, **change}).valid()


def test_valid_fills_defaults_without_mutating():
    raw = HypervisorConfig()
    filled = raw.valid()
    assert raw.num_vcpus == 0 and filled.num_vcpus == 1 and filled.memory_mib == 2048
    assert filled.kernel_path and filled.initrd_path


def test_missing_boot_file_is_named():
    cfg = HypervisorConfig(kernel_path="/nonexistent/vmlinux", initrd_path="/i", qemu_path="/bin/sh").valid()
    with pytest.raises(ConfigError, match="kernel_path '/nonexistent/vmlinux' does not exist"):
        cfg.check_files()


def test_vm_config_json_round_trips_and_is_stable():
    cfg = VMConfig(hypervisor=HypervisorConfig(memory_mib=1024), agent=AgentConfig(debug=True))
    raw = cfg.to_json()
    assert VMConfig.from_json(raw) == cfg
    assert raw == VMConfig.from_json(raw).to_json()


def test_vm_config_json_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown hypervisor config key.*: bogus"):
        VMConfig.from_json(b'{"hypervisor": {"bogus": 1}}')


def test_auto_accelerator_refuses_pvm_kvm(tmp_path):
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/kvm").touch()
    (tmp_path / "sys/module/kvm_pvm").mkdir(parents=True)
    chosen = choose("auto", "/usr/bin/qemu-system-x86_64", sys_root=str(tmp_path))
    assert chosen.name == "tcg" and "kvm_pvm" in chosen.reason


def test_auto_accelerator_without_kvm_device(tmp_path):
    chosen = choose("auto", "/usr/bin/qemu-system-x86_64", sys_root=str(tmp_path))
    assert chosen.name == "tcg" and "/dev/kvm does not exist" in chosen.reason


def test_explicit_accelerators_are_taken_as_given():
    assert choose("kvm", "q").name == "kvm" and choose("tcg", "q").name == "tcg"
    with pytest.raises(ConfigError, match="'xen'"):
        choose("xen", "q")


def test_commas_in_paths_are_escaped_so_they_cannot_add_options():
    cfg = _cfg(boot_to_be_template=True, memory_path="/t/mem,share=off")
    cmd = cmdline.build(cfg, TCG, RunDir(Path("/r,x"), "v"), "v")
    joined = "\n".join(cmd)
    assert "mem-path=/t/mem,,share=off,share=on" in joined
    assert "path=/r,,x/v/logs/console.log" in joined and "unix:/r,,x/v/qmp.sock,server=on" in joined
    assert "path=/r,,x/v/agent.sock,server=on" in joined
