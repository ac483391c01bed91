"""OCI bundle config.json: loading, the checks this runtime needs, sizing, and `spec`.

Only the parts a VM sandbox uses are read; everything is validated up front so
that create fails with one line naming the problem, before any VM exists. What
the guest cannot honour is refused by name (or, where ignoring it changes no
guarantee a container relies on, listed in BundleSpec.warnings by name): never
silently dropped. What engines (Docker, nerdctl, CRI) put in every config.json, and what
happens to each field: docs/oci-policy.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from runtime.errors import KataRuntimeError
from runtime.oci.hooks import Hook, HookError, parse_hooks

SUPPORTED_OCI_MAJOR = "1."
OCI_VERSION = "1.0.2"
MIB = 1024 * 1024


class SpecError(KataRuntimeError):
    """The bundle or its config.json cannot be used."""


CAPABILITY_SETS = ("bounding", "effective", "permitted", "inheritable", "ambient")
# Capabilities that would let a container leave its namespaces inside the guest (mount the
# host's share again, ptrace its init, load modules, raw device access), or reach past them
# through the guest kernel.
REFUSED_CAPABILITIES = ("CAP_SYS_ADMIN", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_PTRACE", "CAP_BPF")
RLIMIT_NAMES = ("RLIMIT_CPU RLIMIT_FSIZE RLIMIT_DATA RLIMIT_STACK RLIMIT_CORE RLIMIT_RSS RLIMIT_NPROC RLIMIT_NOFILE "
                "RLIMIT_MEMLOCK RLIMIT_AS RLIMIT_LOCKS RLIMIT_SIGPENDING RLIMIT_MSGQUEUE RLIMIT_NICE RLIMIT_RTPRIO "
                "RLIMIT_RTTIME").split()
# What the guest mounts in every container itself (guest/contain/contain.c); the same mount in
# config.json is that one.
GUEST_DEFAULT_MOUNTS = {"/proc": "proc", "/dev": "tmpfs", "/dev/pts": "devpts", "/dev/shm": "tmpfs",
                        "/dev/mqueue": "mqueue", "/sys": "sysfs"}
GUEST_MOUNT_TYPES = ("proc", "sysfs", "tmpfs", "devpts", "mqueue")
# Namespaces the guest makes for every container; "network" is the VM's own.
CONTAINER_NAMESPACES = ("pid", "mount", "ipc", "uts", "network")
# Sysctls that live in a namespace the container has (runc's list): net.* in its network
# namespace (here the VM's own), the IPC ones in its IPC namespace. Any other changes the kernel
# for every process, which runc refuses and so do we (in the guest: the agent's too).
NAMESPACED_SYSCTLS = ("kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall",
                      "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced", "kernel.domainname",
                      "kernel.hostname")
NAMESPACED_SYSCTL_PREFIXES = ("net.", "fs.mqueue.")
# A host bind of the container's /dev/shm is the engine's shared-memory tmpfs: memory cannot be
# shared with a VM through a file share, so the container keeps the guest's own /dev/shm.
SHM_DESTINATION = "/dev/shm"
# config.json fields the guest does not implement, refused when set (non-empty).
REFUSED_FIELDS = {
    "linux.devices": "device nodes beyond the default set are not implemented: a VM has no host devices",
    "linux.uidMappings": "user namespaces are not implemented",
    "linux.gidMappings": "user namespaces are not implemented",
    "linux.intelRdt": "Intel RDT is not available in the guest",
    "linux.personality": "personality is not implemented",
    "linux.timeOffsets": "time namespaces are not implemented",
    "process.user.umask": "umask is not implemented",
    "solaris": "not a Linux container",
    "windows": "not a Linux container",
    "vm": "this runtime chooses its own VM",
}
# Set but without effect on what the container can reach: warned about by name.
WARNED_FIELDS = {
    "process.consoleSize": "the engine sets the size on the console socket's terminal",
    "process.oomScoreAdj": "not applied in the guest",
    "process.scheduler": "not applied in the guest",
    "process.ioPriority": "not applied in the guest",
    "process.user.username": "ignored (uid and gid are used)",
    "linux.cgroupsPath": "the VM is the container's resource boundary",
    "linux.rootfsPropagation": "container mounts are always private",
    "domainname": "not applied in the guest",
    # Docker, nerdctl and CRI set these on every container; the guest kernel runs no LSM policy.
    # What they confine (the container's reach into its kernel) is held by the VM here.
    "process.apparmorProfile": "AppArmor is not applied in the guest: the VM is the isolation boundary",
    "process.selinuxLabel": "SELinux is not applied in the guest: the VM is the isolation boundary",
    "linux.mountLabel": "SELinux is not applied in the guest: the VM is the isolation boundary",
}


@dataclasses.dataclass(frozen=True)
class SpecPolicy:
    """What configuration.toml decides about config.json fields."""
    # As upstream Kata's [runtime] disable_guest_seccomp (default true): a seccomp profile is
    # ignored with a warning, since the VM is the isolation boundary; false refuses it, because
    # the guest cannot apply it.
    disable_guest_seccomp: bool = True


def _field(raw: dict[str, Any], dotted: str) -> Any:
    value: Any = raw
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def unsupported_fields(raw: dict[str, Any], where: str, policy: SpecPolicy = SpecPolicy()) -> list[str]:
    """Raises SpecError for the first refused field that is set; returns warnings for the rest."""
    for dotted, why in REFUSED_FIELDS.items():
        if _field(raw, dotted) not in (None, "", [], {}):
            raise SpecError(f"{where}: {dotted} is not supported ({why}); remove it from config.json")
    warnings = [f"{where}: {dotted} is ignored ({why})" for dotted, why in WARNED_FIELDS.items()
                if _field(raw, dotted) not in (None, "", [], {})]
    if _field(raw, "linux.seccomp") not in (None, {}):
        if not policy.disable_guest_seccomp:
            raise SpecError(f"{where}: linux.seccomp is not supported (seccomp filters are not implemented in the "
                            "guest, and [runtime] disable_guest_seccomp = false asks for them); remove the profile "
                            "or set disable_guest_seccomp = true")
        warnings.append(f"{where}: linux.seccomp is ignored ([runtime] disable_guest_seccomp = true: the profile is "
                        "not applied in the guest; the VM is the isolation boundary)")
    return warnings


def _sysctls(raw: Any, where: str) -> dict[str, str]:
    """The namespaced sysctls, for the guest to set in the container; SpecError for the others, as
    runc (guest/agent/containment.py checks the same list)."""
    if raw in (None, {}):
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise SpecError(f"{where}: linux.sysctl must be an object of name: value strings, got {raw!r}")
    for name in raw:
        if name not in NAMESPACED_SYSCTLS and not name.startswith(NAMESPACED_SYSCTL_PREFIXES):
            raise SpecError(f"{where}: linux.sysctl {name} is not in a namespace of the container (it would change "
                            "the kernel for every process, the guest agent's too); remove it")
    return dict(raw)


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    args: list[str]
    env: list[str]
    cwd: str
    uid: int
    gid: int
    additional_gids: list[int]
    terminal: bool = False
    # OCI sets by name; None: the guest's default set.
    capabilities: dict[str, list[str]] | None = None
    rlimits: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)  # (type, soft, hard)
    no_new_privileges: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BundleSpec:
    bundle: str
    oci_version: str
    rootfs: str  # absolute host path
    rootfs_readonly: bool
    hostname: str
    process: ProcessSpec
    annotations: dict[str, str]
    vcpus: int  # 0: not asked
    memory_mib: int  # 0: not asked
    # OCI mounts for the guest to make, in order: bind sources are paths inside the rootfs, except
    # entries with "host": True, whose source is a host path the shim shares with the VM first
    # (runtime/sandbox/hostside.py) and replaces by the guest's path.
    mounts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    readonly_paths: list[str] = dataclasses.field(default_factory=list)
    masked_paths: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    # Stage -> hooks to run on the host (runtime/oci/hooks.py), in order.
    hooks: dict[str, list[Hook]] = dataclasses.field(default_factory=dict)
    # The shim's network namespace: None: none asked (the shim stays where it is), "": a new
    # one, else the path of one to join (CRI: the pod's).
    network_namespace: str | None = None
    # linux.sysctl, namespaced ones only: set by the guest in the container.
    sysctls: dict[str, str] = dataclasses.field(default_factory=dict)

    def host_mounts(self) -> list[dict[str, Any]]:
        return [m for m in self.mounts if m.get("host")]


def parse_process(raw: Any, where: str) -> ProcessSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: process must be an object")
    args = raw.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise SpecError(f"{where}: process.args must be a non-empty list of strings, got {args!r}")
    env = raw.get("env", [])
    if not isinstance(env, list) or not all(isinstance(e, str) and "=" in e for e in env):
        raise SpecError(f"{where}: process.env must be a list of NAME=value strings, got {env!r}")
    cwd = raw.get("cwd", "/")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise SpecError(f"{where}: process.cwd must be an absolute path, got {cwd!r}")
    user = raw.get("user", {}) or {}
    uid, gid = user.get("uid", 0), user.get("gid", 0)
    gids = user.get("additionalGids", []) or []
    for name, value in (("uid", uid), ("gid", gid)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SpecError(f"{where}: process.user.{name} must be a non-negative integer, got {value!r}")
    if not isinstance(gids, list) or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gids):
        raise SpecError(f"{where}: process.user.additionalGids must be a list of non-negative integers, got {gids!r}")
    terminal = raw.get("terminal", False)
    if not isinstance(terminal, bool):
        raise SpecError(f"{where}: process.terminal must be true or false, got {terminal!r}")
    no_new_privileges = raw.get("noNewPrivileges", False)
    if not isinstance(no_new_privileges, bool):
        raise SpecError(f"{where}: process.noNewPrivileges must be true or false, got {no_new_privileges!r}")
    return ProcessSpec(list(args), list(env), cwd, uid, gid, list(gids), terminal=terminal,
                       capabilities=_capabilities(raw.get("capabilities"), where),
                       rlimits=_rlimits(raw.get("rlimits"), where), no_new_privileges=no_new_privileges)


def _capabilities(raw: Any, where: str) -> dict[str, list[str]] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: process.capabilities must be an object of capability sets, got {raw!r}")
    sets: dict[str, list[str]] = {}
    for name, names in raw.items():
        if name not in CAPABILITY_SETS:
            raise SpecError(f"{where}: process.capabilities.{name} is not a capability set "
                            f"({', '.join(CAPABILITY_SETS)})")
        if not isinstance(names, list) or not all(isinstance(n, str) and n.startswith("CAP_") for n in names):
            raise SpecError(f"{where}: process.capabilities.{name} must be a list of CAP_* names, got {names!r}")
        refused = sorted(set(names) & set(REFUSED_CAPABILITIES))
        if refused:
            raise SpecError(f"{where}: process.capabilities.{name} asks for {', '.join(refused)}, which would let the "
                            "container leave its namespaces inside the guest; remove it")
        sets[name] = list(names)
    return sets


def _rlimits(raw: Any, where: str) -> list[tuple[str, int, int]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise SpecError(f"{where}: process.rlimits must be a list, got {raw!r}")
    limits = []
    for entry in raw:
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind not in RLIMIT_NAMES:
            raise SpecError(f"{where}: process.rlimits entry {entry!r}: "
                            "type must be one of RLIMIT_NOFILE, RLIMIT_NPROC, ...")
        soft, hard = entry.get("soft"), entry.get("hard")
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64
                   for v in (soft, hard)) or soft > hard:
            raise SpecError(f"{where}: process.rlimits {kind}: soft {soft!r} and hard {hard!r} "
                            "must be integers, soft <= hard")
        limits.append((kind, soft, hard))
    return limits


def _inside(rootfs: str, host_path: str) -> str | None:
    """The container path of `host_path` if it lies inside `rootfs` (symlinks resolved), else None."""
    real_root, real = os.path.realpath(rootfs), os.path.realpath(host_path)
    if real == real_root:
        return "/"
    if real.startswith(real_root + os.sep):
        return "/" + os.path.relpath(real, real_root)
    return None


def _host_bind(source: str, destination: str, options: list[str], name: str) -> dict[str, Any]:
    """A bind of a host path outside the rootfs, checked for what a VM can be given: a regular file
    or a directory (symlinks resolved here, on the host, from the engine's path)."""
    try:
        mode = os.stat(source).st_mode
    except OSError as err:
        raise SpecError(f"{name} {destination}: bind source {source}: {err.strerror}") from None
    if stat.S_ISSOCK(mode):
        what = "a Unix socket, which a file share cannot connect to from a VM"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        what = "a device node, and a VM has no host devices"
    elif stat.S_ISFIFO(mode):
        what = "a FIFO, which a file share cannot pass to a VM"
    else:
        return {"type": "bind", "source": source, "destination": destination, "options": list(options),
                "host": True}
    raise SpecError(f"{name} {destination}: bind source {source} is {what}; remove the mount")


def mount_readonly(options: list[str]) -> bool:
    """The last of ro/rw wins, as mount(8) reads options."""
    flags = [o for o in options if o in ("ro", "rw")]
    return bool(flags) and flags[-1] == "ro"


def _mounts(raw: Any, bundle: str, rootfs: str, where: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(mounts for the guest, warnings). A bind of a host path outside the rootfs is marked "host"
    for the shim to share with the VM."""
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        raise SpecError(f"{where}: mounts must be a list, got {raw!r}")
    mounts: list[dict[str, Any]] = []
    warnings: list[str] = []
    for index, mount in enumerate(raw):
        name = f"{where}: mounts[{index}]"
        if not isinstance(mount, dict):
            raise SpecError(f"{name} must be an object, got {mount!r}")
        destination, options = mount.get("destination"), mount.get("options", []) or []
        if not isinstance(destination, str) or not destination.startswith("/"):
            raise SpecError(f"{name}: destination must be an absolute path, got {destination!r}")
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise SpecError(f"{name} {destination}: options must be a list of strings, got {options!r}")
        kind = mount.get("type") or ""
        if kind in ("bind", "none", "") and ({"bind", "rbind"} & set(options) or kind == "bind"):
            kind = "bind"
        destination = os.path.normpath(destination)
        if GUEST_DEFAULT_MOUNTS.get(destination) == kind:
            continue  # the guest mounts this in every container (sysfs always read-only)
        if kind == "cgroup":
            warnings.append(f"{name} {destination}: cgroup mounts are not supported in the guest; skipped")
            continue
        if kind == "bind":
            source = mount.get("source")
            if not isinstance(source, str) or not source:
                raise SpecError(f"{name} {destination}: a bind mount needs a source")
            host_source = source if os.path.isabs(source) else os.path.join(bundle, source)
            inside = _inside(rootfs, host_source)
            if inside is not None:
                mounts.append({"type": "bind", "source": inside, "destination": destination,
                               "options": list(options)})
            elif destination == SHM_DESTINATION:
                warnings.append(f"{name} {destination}: the host's shared memory directory {host_source} is not "
                                "shared with the VM; the container gets the guest's own tmpfs")
            else:
                mounts.append(_host_bind(host_source, destination, list(options), name))
        elif kind in GUEST_MOUNT_TYPES:
            mounts.append({"type": kind, "source": str(mount.get("source") or kind), "destination": destination,
                           "options": list(options)})
        else:
            raise SpecError(f"{name} {destination}: mount type {kind!r} is not supported "
                            f"(bind inside the rootfs, {', '.join(GUEST_MOUNT_TYPES)})")
    return mounts, warnings


def _paths(linux: dict[str, Any], key: str, where: str) -> list[str]:
    paths = linux.get(key, []) or []
    if not isinstance(paths, list) or not all(isinstance(p, str) and p.startswith("/") for p in paths):
        raise SpecError(f"{where}: linux.{key} must be a list of absolute paths, got {paths!r}")
    return list(paths)


def _check_namespaces(linux: dict[str, Any], where: str) -> tuple[str | None, list[str]]:
    """(the shim's network namespace, see BundleSpec.network_namespace; warnings). Raises SpecError
    for namespaces the guest cannot give.

    The network namespace is the host's side of the container: engines configure it through the
    pid they are given (the shim's), so the shim takes a new one or joins the one named; the VM's
    guest has its own network either way. The other namespaces are made in the guest; a path to
    share one (CRI: the pod's pause container) cannot be honoured, since each container is its own
    VM here."""
    warnings = []
    network: str | None = None
    namespaces = linux.get("namespaces", []) or []
    if not isinstance(namespaces, list):
        raise SpecError(f"{where}: linux.namespaces must be a list, got {namespaces!r}")
    for namespace in namespaces:
        kind = namespace.get("type") if isinstance(namespace, dict) else None
        path = namespace.get("path") or "" if isinstance(namespace, dict) else ""
        if not isinstance(path, str) or (path and not os.path.isabs(path)):
            raise SpecError(f"{where}: linux.namespaces {kind} path {path!r} must be an absolute path")
        if kind == "cgroup":
            # runc's default spec asks for it; containers get no cgroup filesystem to see anyway.
            warnings.append(f"{where}: linux.namespaces type 'cgroup' is ignored (no cgroup filesystem in the guest)")
            continue
        if kind not in CONTAINER_NAMESPACES:
            raise SpecError(f"{where}: linux.namespaces type {kind!r} is not supported "
                            f"(the guest gives every container {', '.join(CONTAINER_NAMESPACES)})")
        if kind == "network":
            network = path
        elif path:
            warnings.append(f"{where}: linux.namespaces {kind} path {path} is ignored (each container is its own VM "
                            f"here: it gets a {kind} namespace of its own in its guest)")
    if namespaces and network is None:
        warnings.append(f"{where}: linux.namespaces has no 'network' (host networking): the container still gets "
                        "only its VM's network, never the host's")
    return network, warnings


def _resources(linux: dict[str, Any], where: str) -> tuple[int, int]:
    """(vCPUs, MiB) asked. linux.resources.devices (cgroup device rules, on every engine's config)
    is ignored without a warning: a VM has no host devices for the rules to open or close."""
    resources = linux.get("resources", {}) or {}
    cpu = resources.get("cpu", {}) or {}
    quota, period = cpu.get("quota"), cpu.get("period")
    vcpus = 0
    if quota is not None and period:
        if not isinstance(quota, int) or not isinstance(period, int) or period <= 0:
            raise SpecError(f"{where}: linux.resources.cpu quota/period must be integers, got {quota!r}/{period!r}")
        if quota > 0:
            vcpus = math.ceil(quota / period)
    limit = (resources.get("memory", {}) or {}).get("limit")
    memory = 0
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise SpecError(f"{where}: linux.resources.memory.limit must be an integer, got {limit!r}")
        if limit > 0:
            memory = math.ceil(limit / MIB)
    return vcpus, memory


def load_bundle(bundle: str, policy: SpecPolicy = SpecPolicy()) -> BundleSpec:
    bundle = os.path.abspath(bundle)
    where = os.path.join(bundle, "config.json")
    if not os.path.isdir(bundle):
        raise SpecError(f"bundle {bundle} is not a directory")
    try:
        raw = json.loads(Path(where).read_text())
    except FileNotFoundError:
        raise SpecError(f"bundle {bundle} has no config.json (make one with `kata-runtime spec`)") from None
    except ValueError as err:
        raise SpecError(f"{where} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: top level must be an object")
    version = raw.get("ociVersion")
    if not isinstance(version, str) or not version.startswith(SUPPORTED_OCI_MAJOR):
        raise SpecError(f"{where}: ociVersion {version!r} is not supported (need 1.x)")
    root = raw.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("path"), str):
        raise SpecError(f"{where}: root.path is missing")
    rootfs = root["path"] if os.path.isabs(root["path"]) else os.path.join(bundle, root["path"])
    if not os.path.isdir(rootfs):
        raise SpecError(f"{where}: root.path {rootfs} is not a directory")
    process = parse_process(raw.get("process"), where)
    linux = raw.get("linux", {}) or {}
    if not isinstance(linux, dict):
        raise SpecError(f"{where}: linux must be an object")
    vcpus, memory = _resources(linux, where)
    network, namespace_warnings = _check_namespaces(linux, where)
    warnings = unsupported_fields(raw, where, policy) + namespace_warnings
    mounts, mount_warnings = _mounts(raw.get("mounts"), bundle, rootfs, where)
    try:
        hooks, hook_warnings = parse_hooks(raw.get("hooks"))
    except HookError as err:
        raise SpecError(f"{where}: {err}") from None
    annotations = raw.get("annotations", {}) or {}
    return BundleSpec(bundle, version, rootfs, bool(root.get("readonly", False)), str(raw.get("hostname", "")),
                      process, {str(k): str(v) for k, v in annotations.items()}, vcpus, memory,
                      mounts=mounts, readonly_paths=_paths(linux, "readonlyPaths", where),
                      masked_paths=_paths(linux, "maskedPaths", where),
                      warnings=warnings + mount_warnings + [f"{where}: {w}" for w in hook_warnings],
                      hooks=hooks, network_namespace=network, sysctls=_sysctls(linux.get("sysctl"), where))


def find_executable(rootfs: str, process: ProcessSpec) -> str:
    """Resolves args[0] inside the rootfs as the guest will (PATH from the env)."""
    program = process.args[0]

    def runnable(path: str) -> bool:
        # lexists, not exists: busybox-style applets are absolute symlinks
        # that only resolve inside the container's root.
        return os.path.lexists(os.path.join(rootfs, path.lstrip("/")))

    if "/" in program:
        path = program if program.startswith("/") else os.path.join(process.cwd, program)
        if runnable(path):
            return path
        raise SpecError(f"process.args[0] {program!r} not found in the rootfs {rootfs}")
    env_path = next((e.split("=", 1)[1] for e in process.env if e.startswith("PATH=")),
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    for directory in env_path.split(":"):
        candidate = os.path.join(directory or "/", program)
        if runnable(candidate):
            return candidate
    raise SpecError(f"process.args[0] {program!r} not found in the rootfs {rootfs} (PATH={env_path})")


def default_spec() -> dict[str, Any]:
    """What `kata-runtime spec` writes: runc's default, trimmed to what applies here."""
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "kata",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {
            "resources": {},
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"},
                           {"type": "mount"}],
        },
        "annotations": {},
    }
