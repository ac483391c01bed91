"""config.json: what the guest honours is passed on, what it cannot is refused or warned by name."""
from __future__ import annotations

import json
import os

import pytest

from runtime.oci.spec import SpecError, default_spec, load_bundle, parse_process


def _bundle(tmp_path, **changes) -> str:
    (tmp_path / "rootfs" / "data").mkdir(parents=True)
    config = default_spec()
    for dotted, value in changes.items():
        target = config
        *parents, last = dotted.split("__")
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_the_default_spec_loads_with_its_default_mounts_left_to_the_guest(tmp_path):
    spec = load_bundle(_bundle(tmp_path))
    assert spec.mounts == [] and spec.warnings == []
    assert spec.process.no_new_privileges is True
    assert spec.process.rlimits == [("RLIMIT_NOFILE", 1024, 1024)]
    assert spec.process.capabilities is None  # the guest's default set


def test_process_user_capabilities_and_rlimits_are_parsed():
    process = parse_process({
        "args": ["sh"], "user": {"uid": 1000, "gid": 100, "additionalGids": [5, 6]},
        "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "ambient": []},
        "rlimits": [{"type": "RLIMIT_NPROC", "soft": 10, "hard": 20}], "noNewPrivileges": True,
    }, "config.json")
    assert (process.uid, process.gid, process.additional_gids) == (1000, 100, [5, 6])
    assert process.capabilities == {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "ambient": []}
    assert process.rlimits == [("RLIMIT_NPROC", 10, 20)] and process.no_new_privileges


@pytest.mark.parametrize("process,message", [
    ({"capabilities": {"bounding": ["CAP_SYS_ADMIN"]}}, "process.capabilities.bounding asks for CAP_SYS_ADMIN"),
    ({"capabilities": {"bonding": []}}, "process.capabilities.bonding is not a capability set"),
    ({"rlimits": [{"type": "RLIMIT_FOO", "soft": 1, "hard": 1}]}, "type must be one of RLIMIT_NOFILE"),
    ({"rlimits": [{"type": "RLIMIT_NOFILE", "soft": 2, "hard": 1}]}, "soft 2 and hard 1"),
    ({"user": {"additionalGids": ["wheel"]}}, "process.user.additionalGids must be a list of non-negative integers"),
    ({"noNewPrivileges": "yes"}, "process.noNewPrivileges must be true or false"),
])
def test_bad_process_fields_are_named(process, message):
    with pytest.raises(SpecError) as err:
        parse_process({"args": ["sh"], **process}, "config.json")
    assert message in str(err.value)


def test_a_bind_inside_the_rootfs_becomes_a_container_path(tmp_path):
    bundle = _bundle(tmp_path, mounts=[
        {"destination": "/mnt/data", "type": "bind", "source": str(tmp_path / "rootfs" / "data"),
         "options": ["rbind", "ro"]},
        {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]},
        {"destination": "/mnt/rel", "type": "none", "source": "rootfs/data", "options": ["bind"]},
    ])
    spec = load_bundle(bundle)
    assert spec.mounts == [
        {"type": "bind", "source": "/data", "destination": "/mnt/data", "options": ["rbind", "ro"]},
        {"type": "tmpfs", "source": "tmpfs", "destination": "/scratch", "options": ["size=1m"]},
        {"type": "bind", "source": "/data", "destination": "/mnt/rel", "options": ["bind"]},
    ]


def test_a_host_bind_mount_is_refused_naming_it(tmp_path):
    host_dir = tmp_path / "host-secrets"
    host_dir.mkdir()
    bundle = _bundle(tmp_path, mounts=[{"destination": "/secrets", "type": "bind", "source": str(host_dir)}])
    with pytest.raises(SpecError,
                       match=f"mounts\\[0\\] /secrets: bind source {host_dir} is a host path outside the rootfs"):
        load_bundle(bundle)


def test_a_symlink_out_of_the_rootfs_is_a_host_bind(tmp_path):
    (tmp_path / "outside").mkdir()
    bundle = _bundle(tmp_path)
    os.symlink(str(tmp_path / "outside"), tmp_path / "rootfs" / "escape")
    config = json.loads((tmp_path / "config.json").read_text())
    config["mounts"] = [{"destination": "/e", "type": "bind", "source": str(tmp_path / "rootfs" / "escape")}]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecError, match="is a host path outside the rootfs"):
        load_bundle(bundle)


@pytest.mark.parametrize("field,value,message", [
    ("linux__seccomp", {"defaultAction": "SCMP_ACT_ERRNO"}, "linux.seccomp is not supported"),
    ("linux__sysctl", {"net.ipv4.ip_forward": "1"}, "linux.sysctl is not supported"),
    ("linux__devices", [{"path": "/dev/fuse", "type": "c"}], "linux.devices is not supported"),
    ("process__apparmorProfile", "docker-default", "process.apparmorProfile is not supported"),
    ("process__selinuxLabel", "system_u:system_r:container_t", "process.selinuxLabel is not supported"),
    ("hooks", {"prestart": [{"path": "/bin/true"}]}, "hooks is not supported"),
    ("linux__namespaces", [{"type": "user"}], "linux.namespaces type 'user' is not supported"),
    ("linux__namespaces", [{"type": "network", "path": "/proc/1/ns/net"}], "joining a host namespace"),
    ("mounts", [{"destination": "/x", "type": "overlay", "source": "o"}], "mount type 'overlay' is not supported"),
])
def test_unsupported_fields_are_refused_by_name(tmp_path, field, value, message):
    with pytest.raises(SpecError) as err:
        load_bundle(_bundle(tmp_path, **{field: value}))
    assert message in str(err.value)


def test_ignorable_fields_are_warned_about_by_name(tmp_path):
    spec = load_bundle(_bundle(tmp_path, linux__cgroupsPath="/kata/c1", process__oomScoreAdj=100,
                               linux__namespaces=[{"type": "pid"}, {"type": "cgroup"}], mounts=[
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"}]))
    assert any("linux.cgroupsPath is ignored" in w for w in spec.warnings)
    assert any("process.oomScoreAdj is ignored" in w for w in spec.warnings)
    assert any("/sys/fs/cgroup: cgroup mounts are not supported" in w for w in spec.warnings)
    assert any("linux.namespaces type 'cgroup' is ignored" in w for w in spec.warnings)
