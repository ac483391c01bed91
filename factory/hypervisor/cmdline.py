"""The QEMU command line for each launch mode: direct boot, template, clone.

A clone's device list must equal its template's (QEMU does not notice an extra
or missing device, the guest just never sees it), so all three modes come
from one function and differ only where they must.
"""
from __future__ import annotations

from factory.config import HypervisorConfig
from factory.hypervisor.accelerator import Accelerator
from factory.hypervisor.rundir import RunDir

# Our own kernel command line; the config's kernel_params are appended.
# panic=-1 with -no-reboot turns a guest panic into a QEMU exit we can report.
# no_ipi_broadcast=1: under TCG the first hot-added vCPU otherwise takes ~12.5 s to come
# online (the broadcast IPI does not wake it); with it, 0.4-1.2 s.
# The rest is what upstream Kata passes to skip probes a VM never needs. Measured on a direct boot
# under TCG (QEMU start to agent answered, boots interleaved): all of them 3.89 -> 3.48 s (3 each);
# cryptomgr.notests + noreplace-smp alone 4.34 -> 3.80 s (2 each), the others within the noise.
# cryptomgr.notests skips the crypto self-tests; noreplace-smp keeps the SMP lock prefixes instead
# of patching them out for the one boot CPU and back in for the first hot-added one; tsc=reliable
# and no_timer_check skip the clocksource watchdog and the timer IRQ check; rcu_expedited shortens
# boot-time RCU grace periods; the i8042 options stop the PS/2 probe (no keyboard or mouse here).
# init_on_alloc=0: Debian's kernel zeroes every page and slab allocation (INIT_ON_ALLOC_DEFAULT_ON,
# a hardening against leaks through uninitialised kernel memory); under TCG that zeroing is ~0.3 s
# of a direct boot (3.54 -> 3.19 s, 4 boots each, interleaved), much of it the initramfs unpacked
# into freshly allocated pages. The host trusts nothing in the guest (design.md, trust boundary),
# and pages mapped to user space are zeroed either way.
BASE_KERNEL_PARAMS = ("console=ttyS0 panic=-1 quiet no_ipi_broadcast=1 "
                      "tsc=reliable no_timer_check rcupdate.rcu_expedited=1 cryptomgr.notests noreplace-smp "
                      "i8042.direct=1 i8042.dumbkbd=1 i8042.nopnp=1 i8042.noaux=1 init_on_alloc=0")

AGENT_PORT_NAME = "agent.0"
SHARED_FS_TAG = "kataShared"
MEMORY_BACKEND_ID = "mem0"
# QEMU's -name is this plus the VM ID: how a process is recognised as a given VM's QEMU.
VM_NAME_PREFIX = "kata-vm-"


def build(cfg: HypervisorConfig, accel: Accelerator, run: RunDir, vm_id: str) -> list[str]:
    """`cfg` must already be valid() (defaults filled)."""
    cmd = [
        cfg.qemu_path,
        "-name", f"{VM_NAME_PREFIX}{vm_id}",
        "-machine", f"{cfg.machine},memory-backend={MEMORY_BACKEND_ID}",
        "-accel", accel.name,
        "-cpu", accel.cpu_model,
        "-smp", f"{cfg.num_vcpus},maxcpus={cfg.max_vcpus}",
        "-m", f"{cfg.memory_mib}M,slots={cfg.memory_slots},maxmem={cfg.max_memory_mib}M",
        "-object", _memory_backend(cfg),
        # -display none, not -nographic: QEMU refuses -nographic with -daemonize.
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-rtc", "base=utc",
        "-chardev", f"file,id=console0,path={qemu_opt(run.console_log)}",
        "-serial", "chardev:console0",
        "-qmp", f"unix:{qemu_opt(run.qmp_socket)},server=on,wait=off",
        # QEMU is the server: whoever owns the VM next can connect, and a
        # guest write while nobody is connected waits instead of being lost.
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=agent0,path={qemu_opt(run.agent_socket)},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent0,name={AGENT_PORT_NAME},bus=vser0.0",
        "-device", "virtio-rng-pci,id=rng0",
    ]
    if cfg.vmgenid:
        # A fresh GUID per process: the guest reseeds its CRNG when it changes.
        cmd += ["-device", "vmgenid,id=vmgenid0,guid=auto"]
    if cfg.shared_fs == "virtio-9p":
        cmd += [
            "-fsdev", f"local,id=fs0,path={qemu_opt(run.shared_dir)},security_model=none",
            "-device", f"virtio-9p-pci,id=fs0dev,fsdev=fs0,mount_tag={SHARED_FS_TAG}",
        ]
    if cfg.boot_from_template:
        # Paused until the device state is loaded; no kernel or initrd needed
        # (their pages come from the template's memory file).
        cmd += ["-S", "-incoming", "defer"]
    else:
        params = " ".join(p for p in (BASE_KERNEL_PARAMS, cfg.kernel_params) if p)
        cmd += ["-kernel", cfg.kernel_path, "-initrd", cfg.initrd_path, "-append", params]
    cmd += ["-pidfile", str(run.pidfile), "-daemonize"]
    return cmd


def qemu_opt(value: object) -> str:
    """A value inside a QEMU option string: a comma there would end it and start an option a path
    chose (",share=on", ",server=..."), so it is doubled, QEMU's escape for a literal comma."""
    return str(value).replace(",", ",,")


def _memory_backend(cfg: HypervisorConfig) -> str:
    size = f"size={cfg.memory_mib}M"
    if cfg.boot_to_be_template:
        # share=on: the guest's RAM is written through to the template file.
        return f"memory-backend-file,id={MEMORY_BACKEND_ID},{size},mem-path={qemu_opt(cfg.memory_path)},share=on"
    if cfg.boot_from_template:
        # share=off: a private copy-on-write mapping; clones share unwritten pages.
        return f"memory-backend-file,id={MEMORY_BACKEND_ID},{size},mem-path={qemu_opt(cfg.memory_path)},share=off"
    return f"memory-backend-ram,id={MEMORY_BACKEND_ID},{size}"
