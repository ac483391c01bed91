"""The vmf-contain command line for one CreateProcess: namespaces, mounts, ids, capabilities.

The agent does not set a container up itself: it posix_spawn()s the static helper
guest/contain/contain.c (no Python fork per process, and the set-up runs in C between fork and
exec where it belongs). This module turns the request into the helper's arguments, and refuses
what it cannot honour by name, before anything is spawned.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Sequence, Tuple

from guest.agent.messages import RequestError
from protocols.agent import agent_pb2

# Where build_initramfs puts the helper (CONTAIN_PATH there).
DEFAULT_CONTAIN_PATH = "/sbin/vmf-contain"

# execvp's fallback when the environment has no PATH (what runc and Docker give containers too).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# HOST_NAME_MAX
MAX_HOSTNAME_BYTES = 64

# <linux/capability.h>, 6.1: the bit of each capability.
CAPABILITIES: Dict[str, int] = {
    name: bit
    for bit, name in enumerate(
        "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE "
        "NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO "
        "SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME "
        "SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG "
        "WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE".split()
    )
}
# A container without process.capabilities gets Docker's default set: what images expect to
# work as root (chown, setuid, binding low ports), and nothing that reaches past the container
# (no SYS_ADMIN to mount the share again, no SYS_MODULE, no SYS_RAWIO).
DEFAULT_CAPABILITIES = (
    "CHOWN DAC_OVERRIDE FSETID FOWNER MKNOD NET_RAW SETGID SETUID SETFCAP SETPCAP NET_BIND_SERVICE "
    "SYS_CHROOT KILL AUDIT_WRITE"
).split()

# <asm-generic/resource.h>
RLIMITS: Dict[str, int] = {
    "RLIMIT_" + name: number
    for number, name in enumerate(
        "CPU FSIZE DATA STACK CORE RSS NPROC NOFILE MEMLOCK AS LOCKS SIGPENDING MSGQUEUE NICE RTPRIO RTTIME".split()
    )
}
RLIM_INFINITY = 2**64 - 1

# Always read-only, whatever the config says: writes there reach the guest kernel's own
# settings, and some (kernel.core_pattern, kernel.modprobe) make it run a program as the guest's
# root, outside every container namespace. runc's other default read-only and masked /proc paths
# are applied only when the config lists them: the guest kernel is this sandbox's own, so they
# hide nothing from anyone else, and each is a bind mount (about 8 ms under TCG).
DEFAULT_READONLY_PATHS = ("/proc/sys",)
DEFAULT_MASKED_PATHS: Tuple[str, ...] = ()

# <linux/mount.h>
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS = 1, 2, 4, 8, 16
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 1024, 2048, 4096, 16384
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
# option -> (flags to set, flags to clear)
MOUNT_FLAGS: Dict[str, Tuple[int, int]] = {
    "ro": (MS_RDONLY, 0), "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0), "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0), "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0), "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0), "async": (0, MS_SYNCHRONOUS),
    "noatime": (MS_NOATIME, 0), "atime": (0, MS_NOATIME),
    "nodiratime": (MS_NODIRATIME, 0), "diratime": (0, MS_NODIRATIME),
    "relatime": (MS_RELATIME, 0), "norelatime": (0, MS_RELATIME),
    "strictatime": (MS_STRICTATIME, 0), "nostrictatime": (0, MS_STRICTATIME),
    "bind": (MS_BIND, 0), "rbind": (MS_BIND | MS_REC, 0),
}
# Every container mount is private to the container: propagation options change nothing.
PROPAGATION_OPTIONS = {"private", "rprivate", "slave", "rslave", "shared", "rshared", "unbindable", "runbindable"}
MOUNT_TYPES = ("proc", "sysfs", "tmpfs", "devpts", "mqueue", "bind")
# vmf-contain's name for a bind whose source is in the guest's root (Mount.shared), not the rootfs.
SHARED_BIND = "sharedbind"
# Sysctls a container may set (runc's list): those in a namespace of its own (IPC, UTS) or of its
# VM (net.*). Any other would change the guest kernel for the agent too (kernel.modprobe,
# kernel.core_pattern run programs as guest root). The host checks the same; this is the guest's wall.
NAMESPACED_SYSCTLS = ("kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall",
                      "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced", "kernel.domainname",
                      "kernel.hostname")
NAMESPACED_SYSCTL_PREFIXES = ("net.", "fs.mqueue.")
# A sysctl name is dotted words (interface names in net.ipv4.conf.<if>.* may hold '-' and '@').
SYSCTL_NAME = re.compile(r"^[A-Za-z0-9_@-]+(\.[A-Za-z0-9_@-]+)+$")


def capability_mask(names: Sequence[str], field: str) -> int:
    mask = 0
    for name in names:
        bit = CAPABILITIES.get(name[4:] if name.startswith("CAP_") else "")
        if bit is None:
            raise RequestError(f"capabilities.{field}: {name!r} is not a Linux capability (CAP_CHOWN, CAP_KILL, ...)")
        mask |= 1 << bit
    return mask


def _capability_args(request: agent_pb2.CreateProcessRequest) -> List[str]:
    if request.HasField("capabilities"):
        caps = request.capabilities
        sets = [caps.bounding, caps.effective, caps.permitted, caps.inheritable, caps.ambient]
        names = ["bounding", "effective", "permitted", "inheritable", "ambient"]
        masks = [capability_mask(list(s), n) for s, n in zip(sets, names)]
    else:
        default = capability_mask(["CAP_" + c for c in DEFAULT_CAPABILITIES], "default")
        masks = [default, default, default, 0, 0]
    return ["--caps", *(format(m, "x") for m in masks)]


def _rlimit_args(rlimits: Sequence[agent_pb2.Rlimit]) -> List[str]:
    args: List[str] = []
    for rlimit in rlimits:
        resource = RLIMITS.get(rlimit.type)
        if resource is None:
            raise RequestError(f"rlimit {rlimit.type!r} is not a Linux resource limit (RLIMIT_NOFILE, ...)")
        if rlimit.soft > rlimit.hard:
            raise RequestError(f"rlimit {rlimit.type}: soft limit {rlimit.soft} is above the hard limit {rlimit.hard}")
        args += ["--rlimit", str(resource), str(rlimit.soft), str(rlimit.hard)]
    return args


def mount_flags(options: Sequence[str]) -> Tuple[int, str]:
    """OCI mount options -> (mount flags, data string), as runc splits them."""
    flags = 0
    data: List[str] = []
    for option in options:
        if option in MOUNT_FLAGS:
            set_, clear = MOUNT_FLAGS[option]
            flags = (flags | set_) & ~clear
        elif option in PROPAGATION_OPTIONS:
            continue
        else:
            data.append(option)
    return flags, ",".join(data)


def _check_container_path(what: str, path: str) -> None:
    if not path.startswith("/") or "\0" in path:
        raise RequestError(f"{what} {path!r} is not an absolute path in the container")


def _mount_args(request_mounts: Sequence[agent_pb2.Mount]) -> List[str]:
    args: List[str] = []
    for mount in request_mounts:
        if mount.type not in MOUNT_TYPES:
            raise RequestError(f"mount {mount.destination}: type {mount.type!r} is not supported "
                               f"(one of {', '.join(MOUNT_TYPES)})")
        _check_container_path("mount destination", mount.destination)
        flags, data = mount_flags(mount.options)
        source = mount.source or mount.type
        kind = mount.type
        if mount.type == "bind":
            _check_container_path(f"mount {mount.destination}: bind source (a path inside the rootfs)", mount.source)
            if mount.shared:
                kind = SHARED_BIND  # the source is a guest path, taken before pivot_root
        else:
            flags &= ~(MS_BIND | MS_REC)
        if mount.type == "sysfs":
            flags |= MS_RDONLY  # a writable sysfs reaches the guest kernel (uevent_helper, ...)
        args += ["--mount", kind, source, mount.destination, str(flags), data]
    return args


def _sysctl_args(sysctls: Mapping[str, str]) -> List[str]:
    args: List[str] = []
    for name, value in sorted(sysctls.items()):
        if not SYSCTL_NAME.match(name) or (
                name not in NAMESPACED_SYSCTLS and not name.startswith(NAMESPACED_SYSCTL_PREFIXES)):
            raise RequestError(f"sysctl {name!r} is not one a container may set (net.*, fs.mqueue.*, the IPC and "
                               "UTS kernel.* ones)")
        if "\0" in value or "\n" in value:
            raise RequestError(f"sysctl {name}: value {value!r} holds a NUL or newline")
        args += ["--sysctl", "/proc/sys/" + name.replace(".", "/"), value]
    return args


def helper_args(contain_path: str, request: agent_pb2.CreateProcessRequest, search_path: str,
                join: Tuple[int, int] = (0, 0)) -> List[str]:
    """argv for the helper. `search_path`: the PATH the helper finds args[0] in (inside the
    container, as execvp). `join`: (init pid, its parent: the container's outer process) of the
    container an exec joins, else (0, 0)."""
    args = [contain_path]
    if request.guest_root:
        args.append("--guest-root")
    elif join[0]:
        args += ["--join", str(join[0]), str(join[1])]
    else:
        args += ["--rootfs", request.rootfs]
        if len(request.hostname.encode()) > MAX_HOSTNAME_BYTES:
            raise RequestError(f"hostname {request.hostname!r} is longer than {MAX_HOSTNAME_BYTES} bytes")
        if request.hostname:
            args += ["--hostname", request.hostname]
        if request.rootfs_readonly:
            args.append("--readonly")
        args += _mount_args(request.mounts)
        args += _sysctl_args(request.sysctls)
        for path in (*DEFAULT_READONLY_PATHS, *request.readonly_paths):
            _check_container_path("readonly path", path)
            args += ["--ro-path", path]
        for path in (*DEFAULT_MASKED_PATHS, *request.masked_paths):
            _check_container_path("masked path", path)
            args += ["--mask-path", path]
    args += _rlimit_args(request.rlimits)
    args += ["--user", str(request.uid), str(request.gid),
             ",".join(str(g) for g in sorted(set(request.additional_gids)))]
    if not request.guest_root or request.HasField("capabilities"):
        args += _capability_args(request)
    if request.no_new_privileges:
        args.append("--no-new-privs")
    if request.terminal:
        args.append("--terminal")
    if request.trace_timing:
        args.append("--timing")
    args += ["--cwd", request.cwd or "/", "--exec", request.args[0], "--search", search_path, request.rootfs or "/",
             "--", *request.args]
    return args
