"""Shared helpers for tests that boot real VMs: a per-test run root that is
always cleaned, a leak check, and the base config the tests boot."""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

from factory import sharedfs
from factory.config import AgentConfig, HypervisorConfig, VMConfig
from factory.vm import VM
from hostos import mounts
from hostos.process import pids_mentioning as processes_mentioning
from tests.integration.bundles import make_bundle

T = TypeVar("T")

# Small guests keep the suite's tmpfs and memory use low on 2-core CI machines.
TEST_MEMORY_MIB = 512
# TCG boots take seconds; on a loaded CI machine several times that.
TEST_BOOT_TIMEOUT_S = 90.0


def base_config(**hypervisor) -> VMConfig:
    hv = dict(memory_mib=TEST_MEMORY_MIB, max_vcpus=4, max_memory_mib=4096, accelerator="auto")
    hv.update(hypervisor)
    return VMConfig(hypervisor=HypervisorConfig(**hv), agent=AgentConfig(dial_timeout_s=TEST_BOOT_TIMEOUT_S)).valid()


def write_config(root: str, template: bool, cache: int, memory_mib: int = TEST_MEMORY_MIB,
                 max_vcpus: int = 4, initrd: str = "", dial_timeout_s: float = TEST_BOOT_TIMEOUT_S,
                 kernel: str = "") -> str:
    """A configuration.toml keeping everything (template, socket, VMs) under `root`."""
    path = os.path.join(root, "configuration.toml")
    Path(path).write_text(f"""
[hypervisor.qemu]
default_memory = {memory_mib}
default_maxvcpus = {max_vcpus}
kernel = "{kernel}"
initrd = "{initrd}"
[agent.kata]
dial_timeout = {dial_timeout_s:.0f}
[factory]
enable_template = {str(template).lower()}
template_path = "{root}/template"
vm_cache_number = {cache}
vm_cache_endpoint = "{root}/cache.sock"
[runtime]
vm_run_root = "{root}/vm"
""")
    return path


# Where the guest mounts the VM's 9p share, as the shim asks it to.
GUEST_SHARED = sharedfs.GUEST_SHARED_DIR
SHARED_TAG = sharedfs.SHARED_FS_TAG


def share_rootfs(vm: VM, container_id: str, args: list[str] | None = None) -> tuple[Path, str]:
    """A busybox rootfs in the VM's share, laid out as the shim does it: made in the host's writable
    view, bind-mounted into the (read-only to the guest) export. Returns the host path to write
    into and the guest path; removing the run directory undoes the mount."""
    run = vm.hypervisor.run
    make_bundle(str(run.shared_writable_dir / container_id), args or ["true"])
    rootfs = run.shared_writable_dir / container_id / "rootfs"
    mounts.bind_recorded(str(rootfs), str(run.shared_dir / container_id / "rootfs"), readonly=False, nosuid_nodev=True)
    return rootfs, f"{GUEST_SHARED}/{container_id}/rootfs"


# How often wait_for looks again: short next to anything worth waiting for across processes.
WAIT_POLL_S = 0.05


def wait_for(what: str, probe: Callable[[], T], timeout_s: float) -> T:
    """Polls `probe` until it returns something truthy and returns that; AssertionError naming
    `what` after `timeout_s`. For conditions in other processes (a server's pool, a shim's state
    file), which no event in this one announces."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"gave up waiting for {what} after {timeout_s:.0f} s"
        time.sleep(WAIT_POLL_S)


def short_tempdir(prefix: str) -> str:
    # Under /tmp directly: socket paths must stay under 107 bytes.
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def mounts_under(root: str) -> list[str]:
    with open("/proc/mounts") as f:
        points = [line.split()[1] for line in f]
    return [p for p in points if p == root or p.startswith(root.rstrip("/") + "/")]


def clean_up_root(root: str) -> list[str]:
    """Kills whatever still runs from `root` and removes it; returns what had leaked."""
    leaks = []
    pids = processes_mentioning(root)
    for pid in pids:
        leaks.append(f"process {pid} still running")
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    for mountpoint in mounts_under(root):
        leaks.append(f"mount {mountpoint} left behind")
        subprocess.run(["umount", "-l", mountpoint], check=False)
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline and processes_mentioning(root):
        time.sleep(0.05)
    if os.path.isdir(root):
        for dirpath, _dirnames, filenames in os.walk(root):
            if "hypervisor.json" in filenames or "pid" in filenames:
                leaks.append(f"VM run directory {dirpath} left behind")
            for name in filenames:
                if stat.S_ISSOCK(os.lstat(os.path.join(dirpath, name)).st_mode) and "hypervisor.json" not in filenames:
                    leaks.append(f"socket {dirpath}/{name} left behind")
        shutil.rmtree(root, ignore_errors=True)
    return leaks
