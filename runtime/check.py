"""kata-runtime check: can this host run factory VMs? One line per check."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from typing import Callable, TextIO

from configuration.loader import RuntimeConfig
from factory.config import HypervisorConfig
from factory.hypervisor import accelerator
from hostos import mounts


def _qemu_capabilities(qemu: str) -> str:
    script = b'{"execute":"qmp_capabilities"}\n{"execute":"query-migrate-capabilities"}\n{"execute":"quit"}\n'
    done = subprocess.run([qemu, "-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio"],
                          input=script, capture_output=True, timeout=20)
    for line in done.stdout.decode(errors="replace").splitlines():
        reply = json.loads(line)
        if isinstance(reply.get("return"), list):
            names = {c["capability"] for c in reply["return"]}
            if "x-ignore-shared" in names:
                return "QEMU supports x-ignore-shared (templates share guest RAM)"
            raise RuntimeError("QEMU lacks the x-ignore-shared migration capability (needs QEMU >= 4.1)")
    raise RuntimeError(f"QEMU did not answer query-migrate-capabilities: {done.stderr.decode(errors='replace')[-300:]}")


def _tmpfs() -> str:
    with tempfile.TemporaryDirectory(prefix="kata-check-") as path:
        mounts.mount_tmpfs(path, 1)
        mounts.unmount_lazy(path)
    return "tmpfs can be mounted (template memory lives on one)"


def _file(path: str, what: str) -> Callable[[], str]:
    def check() -> str:
        if not os.path.isfile(path):
            raise RuntimeError(f"{what} {path} does not exist")
        return f"{what} {path}"
    return check


def _writable_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK):
        raise RuntimeError(f"{path} is not writable")
    return f"{path} is writable"


def run(config: RuntimeConfig, out: TextIO) -> int:
    hv: HypervisorConfig = config.vm_config.hypervisor
    checks = [
        ("qemu", _file(hv.qemu_path, "QEMU")),
        ("migration", lambda: _qemu_capabilities(hv.qemu_path)),
        ("kernel", _file(hv.kernel_path, "guest kernel")),
        ("initrd", _file(hv.initrd_path, "guest initramfs")),
        ("accelerator", lambda: (lambda a: f"{a.name}: {a.reason}")(accelerator.choose(hv.accelerator, hv.qemu_path))),
        ("tmpfs", _tmpfs),
        ("run root", lambda: _writable_dir(config.vm_run_root)),
    ]
    failed = 0
    for name, check in checks:
        try:
            print(f"ok    {name}: {check()}", file=out)
        except Exception as err:  # every check reports, none stops the others
            failed += 1
            print(f"FAIL  {name}: {err}", file=out)
    print("System is capable of running factory VMs" if not failed else f"{failed} check(s) failed", file=out)
    return 1 if failed else 0
