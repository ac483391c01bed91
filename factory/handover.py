"""Checking a VM another process (the VMCache server) hands over, before anything acts on it.

The server's reply names a VM ID, a run directory and a QEMU pid; a client that signalled,
attached to or removed whatever those say would do it for anyone who can answer on the socket. So
each must be what it claims: an ID that is a plain name, a run directory under this client's own
run root, and a live process whose command line names that VM.
"""
from __future__ import annotations

import os
import re
import stat

from factory.errors import FactoryError
from factory.hypervisor.cmdline import VM_NAME_PREFIX
from factory.hypervisor.qemu import QemuState
from hostos import process

# What the factory makes (uuid4) and any plain file name: never a path, never "." or "..".
VM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class HandoverError(FactoryError):
    """The VM a server handed over is not one this client may take."""


def check_handed_vm(vm_id: str, state: QemuState, run_root: str) -> None:
    """Raises HandoverError unless `state` describes VM `vm_id` living under `run_root` and running."""
    if not VM_ID.match(vm_id) or state.id != vm_id:
        raise HandoverError(f"VMCache server handed over VM {vm_id!r} with state for {state.id!r}: not a valid VM ID; "
                            "check who serves the VMCache endpoint")
    if os.path.realpath(state.run_root) != os.path.realpath(run_root):
        raise HandoverError(f"VMCache server handed over VM {vm_id} in run root {state.run_root!r}, not this "
                            f"client's {run_root!r}; give the server and client the same runtime.vm_run_root")
    run_dir = os.path.join(run_root, vm_id)
    try:
        info = os.lstat(run_dir)
    except OSError as err:
        raise HandoverError(f"VMCache server handed over VM {vm_id} without a run directory {run_dir}: {err}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid not in (0, os.geteuid()):
        raise HandoverError(f"VMCache server handed over VM {vm_id} whose run directory {run_dir} is not a directory "
                            "owned by root or this user")
    if not isinstance(state.pid, int) or state.pid <= 1 or not process.is_alive(state.pid, state.pid_start_time):
        raise HandoverError(f"VMCache server handed over VM {vm_id} with pid {state.pid!r}, which is not running "
                            "(or is another process since)")
    try:
        with open(f"/proc/{state.pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError as err:
        raise HandoverError(f"VMCache server handed over VM {vm_id} with pid {state.pid}: unreadable: {err}") from None
    if f"{VM_NAME_PREFIX}{vm_id}".encode() not in argv or b"-name" not in argv:
        raise HandoverError(f"VMCache server handed over VM {vm_id} with pid {state.pid}, whose command line is not "
                            "that VM's QEMU; refusing to touch it")
