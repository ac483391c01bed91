"""Choosing the accelerator: KVM only where it can really run a stock guest kernel.

On machines whose /dev/kvm is PVM (kvm_pvm: a pagetable-based VM that runs only
PVM-built guest kernels) a stock kernel crawls and then hangs, so `auto` must
not pick KVM there even though /dev/kvm opens fine.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import threading

from factory.config import ACCELERATORS
from factory.errors import ConfigError

# A KVM start probe that takes longer than this is as good as a hang.
KVM_PROBE_TIMEOUT_S = 5.0

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str  # "kvm" or "tcg"
    cpu_model: str
    reason: str


_TCG = "tcg"
_choice_lock = threading.Lock()
_auto_choice: dict[str, Accelerator] = {}


def _kvm_unusable_reason(sys_root: str = "/") -> str | None:
    dev = os.path.join(sys_root, "dev/kvm")
    if not os.path.exists(dev):
        return "/dev/kvm does not exist"
    if not os.access(dev, os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    if os.path.exists(os.path.join(sys_root, "sys/module/kvm_pvm")):
        return "/dev/kvm is kvm_pvm (PVM), which cannot run a stock guest kernel"
    if not any(os.path.exists(os.path.join(sys_root, f"sys/module/{m}")) for m in ("kvm_intel", "kvm_amd")):
        return "neither kvm_intel nor kvm_amd is loaded"
    return None


def _probe_kvm(qemu_path: str) -> str | None:
    """Starts QEMU with KVM and `-cpu host` and quits at once; None when it works."""
    cmd = [qemu_path, "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-S", "-nodefaults",
           "-no-user-config", "-display", "none", "-qmp", "stdio"]
    script = b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n'
    try:
        done = subprocess.run(cmd, input=script, capture_output=True, timeout=KVM_PROBE_TIMEOUT_S,
                              start_new_session=True)
    except subprocess.TimeoutExpired:
        return f"a KVM start probe did not finish in {KVM_PROBE_TIMEOUT_S:.0f} s"
    except OSError as err:
        return f"the KVM start probe could not run {qemu_path}: {err}"
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["(no stderr)"]
        return f"QEMU with -accel kvm -cpu host failed: {tail[0]}"
    return None


def choose(setting: str, qemu_path: str, sys_root: str = "/") -> Accelerator:
    """Resolves `auto | kvm | tcg` to what QEMU will use, logging an `auto` choice once."""
    if setting not in ACCELERATORS:
        raise ConfigError(f"accelerator {setting!r} is not one of {', '.join(ACCELERATORS)}")
    if setting == "kvm":
        return Accelerator("kvm", "host", "configured: kvm")
    if setting == "tcg":
        return Accelerator(_TCG, "max", "configured: tcg")
    with _choice_lock:
        key = f"{qemu_path}:{sys_root}"
        if key not in _auto_choice:
            reason = _kvm_unusable_reason(sys_root) or _probe_kvm(qemu_path)
            if reason is None:
                choice = Accelerator("kvm", "host", "auto: KVM is usable (start probe passed)")
            else:
                choice = Accelerator(_TCG, "max", f"auto: TCG because {reason}")
            log.info("accelerator %s (%s)", choice.name, choice.reason)
            _auto_choice[key] = choice
        return _auto_choice[key]
