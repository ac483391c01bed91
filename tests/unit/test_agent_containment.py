"""The helper command line the agent builds for a CreateProcess (guest/agent/containment.py)."""
from __future__ import annotations

import pytest

from guest.agent import containment
from guest.agent.messages import RequestError
from protocols.agent import agent_pb2

HELPER = "/sbin/vmf-contain"


def _args(**fields) -> list[str]:
    fields.setdefault("exec_id", "c1")
    fields.setdefault("args", ["sh", "-c", "true"])
    fields.setdefault("rootfs", "/run/kata-containers/shared/c1/rootfs")
    join = fields.pop("join", (0, 0))
    return containment.helper_args(HELPER, agent_pb2.CreateProcessRequest(**fields), "/usr/bin:/bin", join)


def _option(args: list[str], name: str, width: int = 1) -> list[list[str]]:
    return [args[i + 1:i + 1 + width] for i, a in enumerate(args) if a == name]


def test_a_new_container_gets_its_rootfs_hostname_and_the_default_paths():
    args = _args(hostname="box", rootfs_readonly=True, cwd="/tmp")
    assert args[:3] == [HELPER, "--rootfs", "/run/kata-containers/shared/c1/rootfs"]
    assert _option(args, "--hostname") == [["box"]] and "--readonly" in args
    assert _option(args, "--ro-path") == [["/proc/sys"]] and _option(args, "--mask-path") == []
    more = _args(readonly_paths=["/proc/bus"], masked_paths=["/proc/kcore"])
    assert ["/proc/bus"] in _option(more, "--ro-path") and _option(more, "--mask-path") == [["/proc/kcore"]]
    assert args[args.index("--") + 1:] == ["sh", "-c", "true"]
    assert _option(args, "--exec") == [["sh"]] and _option(args, "--cwd") == [["/tmp"]]
    # The helper finds the program inside the container, in this PATH; the rootfs names it in errors.
    assert _option(args, "--search", 2) == [["/usr/bin:/bin", "/run/kata-containers/shared/c1/rootfs"]]


def test_without_capabilities_a_container_gets_the_default_set_and_never_sys_admin():
    [[bounding, effective, permitted, inheritable, ambient]] = _option(_args(), "--caps", 5)
    mask = int(bounding, 16)
    assert mask & (1 << containment.CAPABILITIES["CHOWN"]) and mask & (1 << containment.CAPABILITIES["KILL"])
    assert not mask & (1 << containment.CAPABILITIES["SYS_ADMIN"])
    assert (effective, permitted, inheritable, ambient) == (bounding, bounding, "0", "0")


def test_capabilities_by_name_and_unknown_names_refused():
    caps = agent_pb2.Capabilities(bounding=["CAP_KILL", "CAP_CHOWN"], effective=["CAP_KILL"], permitted=["CAP_KILL"],
                                  ambient=["CAP_KILL"], inheritable=["CAP_KILL"])
    [[bounding, effective, _, _, ambient]] = _option(_args(capabilities=caps), "--caps", 5)
    assert int(bounding, 16) == (1 << 5) | (1 << 0) and int(effective, 16) == 1 << 5 and int(ambient, 16) == 1 << 5
    with pytest.raises(RequestError, match="capabilities.effective: 'CAP_FLY' is not a Linux capability"):
        _args(capabilities=agent_pb2.Capabilities(effective=["CAP_FLY"]))


def test_user_rlimits_and_no_new_privileges():
    args = _args(uid=1000, gid=100, additional_gids=[20, 10, 20], no_new_privileges=True,
                 rlimits=[agent_pb2.Rlimit(type="RLIMIT_NOFILE", soft=64, hard=128)])
    assert _option(args, "--user", 3) == [["1000", "100", "10,20"]]
    assert _option(args, "--rlimit", 3) == [["7", "64", "128"]] and "--no-new-privs" in args
    with pytest.raises(RequestError, match="rlimit 'RLIMIT_BOGUS' is not a Linux resource limit"):
        _args(rlimits=[agent_pb2.Rlimit(type="RLIMIT_BOGUS")])
    with pytest.raises(RequestError, match="soft limit 9 is above the hard limit 1"):
        _args(rlimits=[agent_pb2.Rlimit(type="RLIMIT_NOFILE", soft=9, hard=1)])


def test_mount_options_split_into_flags_and_data():
    flags, data = containment.mount_flags(["nosuid", "noexec", "mode=755", "rprivate", "size=1m", "ro"])
    assert flags == containment.MS_NOSUID | containment.MS_NOEXEC | containment.MS_RDONLY and data == "mode=755,size=1m"
    assert containment.mount_flags(["ro", "rw"])[0] == 0


def test_mounts_are_passed_in_order_and_sysfs_is_always_read_only():
    mounts = [agent_pb2.Mount(type="tmpfs", source="tmpfs", destination="/scratch", options=["size=1m", "nosuid"]),
              agent_pb2.Mount(type="bind", source="/data", destination="/mnt/data", options=["rbind", "ro"]),
              agent_pb2.Mount(type="sysfs", source="sysfs", destination="/sys2", options=["rw"])]
    got = _option(_args(mounts=mounts), "--mount", 5)
    assert got[0] == ["tmpfs", "tmpfs", "/scratch", str(containment.MS_NOSUID), "size=1m"]
    assert got[1] == ["bind", "/data", "/mnt/data",
                      str(containment.MS_BIND | containment.MS_REC | containment.MS_RDONLY), ""]
    assert got[2][:4] == ["sysfs", "sysfs", "/sys2", str(containment.MS_RDONLY)]


def test_a_shared_bind_is_taken_from_the_guest_not_the_rootfs():
    mount = agent_pb2.Mount(type="bind", source="/run/kata-containers/shared/c1/mounts/7", destination="/etc/hosts",
                            options=["rbind", "ro"], shared=True)
    assert _option(_args(mounts=[mount]), "--mount", 5) == [[
        containment.SHARED_BIND, "/run/kata-containers/shared/c1/mounts/7", "/etc/hosts",
        str(containment.MS_BIND | containment.MS_REC | containment.MS_RDONLY), ""]]


def test_namespaced_sysctls_are_passed_and_others_refused():
    got = _option(_args(sysctls={"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shmmax": "4096"}), "--sysctl", 2)
    assert got == [["/proc/sys/kernel/shmmax", "4096"], ["/proc/sys/net/ipv4/ip_unprivileged_port_start", "0"]]
    for name in ("kernel.core_pattern", "vm.overcommit_memory", "net./../../kernel/modprobe", "net"):
        with pytest.raises(RequestError, match="is not one a container may set"):
            _args(sysctls={name: "1"})


@pytest.mark.parametrize("mount,message", [
    (agent_pb2.Mount(type="cgroup", destination="/sys/fs/cgroup"), "type 'cgroup' is not supported"),
    (agent_pb2.Mount(type="tmpfs", destination="relative"), "mount destination 'relative' is not an absolute path"),
    (agent_pb2.Mount(type="bind", source="data", destination="/d"), "bind source (a path inside the rootfs) 'data'"),
])
def test_bad_mounts_are_refused_by_name(mount, message):
    with pytest.raises(RequestError) as err:
        _args(mounts=[mount])
    assert message in str(err.value)


def test_an_exec_joins_the_container_and_gets_no_new_mounts():
    args = _args(join=(1234, 1200), hostname="ignored")
    assert args[1:4] == ["--join", "1234", "1200"] and "--rootfs" not in args and "--hostname" not in args


def test_guest_root_is_uncontained_and_keeps_capabilities_unless_asked():
    args = _args(guest_root=True, rootfs="/")
    assert args[1] == "--guest-root" and "--caps" not in args and "--ro-path" not in args


def test_hostname_longer_than_the_kernel_allows_is_refused():
    with pytest.raises(RequestError, match="longer than 64 bytes"):
        _args(hostname="h" * 65)
