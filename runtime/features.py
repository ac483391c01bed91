"""`kata-runtime features`: runc's features document, saying what this runtime really supports.

Engines read it to decide what they may put in config.json. The lists are what the guest's
container helper implements (guest/agent/containment.py, which runs in the VM and so cannot be
imported here; tests/unit/test_runc_cli.py checks that the two agree).
"""
from __future__ import annotations

from typing import Any

from runtime.oci.hooks import RUN_STAGES
from runtime.version import RUNTIME_VERSION

OCI_VERSION_MIN = "1.0.0"
OCI_VERSION_MAX = "1.0.2"
# The guest's mount flags, and the propagation options it accepts (every container mount is private).
MOUNT_OPTIONS = (
    "async atime bind dev diratime exec noatime nodev nodiratime noexec norelatime nostrictatime nosuid "
    "private rbind relatime rprivate rshared rslave runbindable ro rw shared slave strictatime suid sync "
    "unbindable"
).split()
# What the guest gives a container (cgroup is accepted and ignored: no cgroup filesystem in the guest).
NAMESPACES = ["ipc", "mount", "network", "pid", "uts"]
CAPABILITIES = [
    "CAP_" + name for name in (
        "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE "
        "NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO "
        "SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME "
        "SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG "
        "WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE").split()
]


def features() -> dict[str, Any]:
    return {
        "ociVersionMin": OCI_VERSION_MIN,
        "ociVersionMax": OCI_VERSION_MAX,
        # Run on the host (runtime/oci/hooks.py); startContainer is skipped with a warning: it
        # would run inside the container, which is in the guest.
        "hooks": list(RUN_STAGES),
        "mountOptions": sorted(MOUNT_OPTIONS),
        "linux": {
            "namespaces": NAMESPACES,
            "capabilities": CAPABILITIES,
            # Each container has a VM: there is no host cgroup, seccomp, AppArmor or SELinux set-up.
            "cgroup": {"v1": False, "v2": False, "systemd": False, "systemdUser": False},
            "seccomp": {"enabled": False},
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
        },
        "annotations": {
            "io.katacontainers.runtime.version": RUNTIME_VERSION,
            "io.katacontainers.runtime.isolation": "vm",
        },
    }
