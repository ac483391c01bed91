"""config.json: what the guest honours is passed on, what it cannot is refused or warned by name."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from runtime.oci.spec import SpecError, SpecPolicy, default_spec, load_bundle, parse_process

FIXTURES = Path(__file__).parent / "fixtures"


def _bundle(tmp_path, **changes) -> str:
    (tmp_path / "rootfs" / "data").mkdir(parents=True, exist_ok=True)
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


def test_a_host_bind_mount_is_marked_for_the_shim_to_share(tmp_path):
    host_dir = tmp_path / "host-data"
    host_dir.mkdir()
    bundle = _bundle(tmp_path, mounts=[{"destination": "/data", "type": "bind", "source": str(host_dir),
                                        "options": ["rbind", "ro"]}])
    spec = load_bundle(bundle)
    assert spec.host_mounts() == [{"type": "bind", "source": str(host_dir), "destination": "/data",
                                   "options": ["rbind", "ro"], "host": True}]


def test_a_symlink_out_of_the_rootfs_is_a_host_bind(tmp_path):
    (tmp_path / "outside").mkdir()
    bundle = _bundle(tmp_path)
    os.symlink(str(tmp_path / "outside"), tmp_path / "rootfs" / "escape")
    config = json.loads((tmp_path / "config.json").read_text())
    config["mounts"] = [{"destination": "/e", "type": "bind", "source": str(tmp_path / "rootfs" / "escape")}]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert [m["destination"] for m in load_bundle(bundle).host_mounts()] == ["/e"]


def test_host_binds_a_vm_cannot_be_given_are_refused_by_name(tmp_path):
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "docker.sock"))
    try:
        bundle = _bundle(tmp_path, mounts=[{"destination": "/var/run/docker.sock", "type": "bind",
                                            "source": str(tmp_path / "docker.sock")}])
        with pytest.raises(SpecError, match="docker.sock is a Unix socket"):
            load_bundle(bundle)
    finally:
        listener.close()
    (tmp_path / "config.json").unlink()
    bundle = _bundle(tmp_path, mounts=[{"destination": "/dev/kvm", "type": "bind", "source": "/dev/null"}])
    with pytest.raises(SpecError, match="/dev/null is a device node"):
        load_bundle(bundle)
    (tmp_path / "config.json").unlink()
    bundle = _bundle(tmp_path, mounts=[{"destination": "/x", "type": "bind", "source": str(tmp_path / "missing")}])
    with pytest.raises(SpecError, match="missing: No such file or directory"):
        load_bundle(bundle)


@pytest.mark.parametrize("field,value,message", [
    ("linux__sysctl", {"kernel.modprobe": "/x"}, "linux.sysctl kernel.modprobe is not in a namespace"),
    ("linux__sysctl", {"vm.overcommit_memory": "1"}, "linux.sysctl vm.overcommit_memory is not in a namespace"),
    ("linux__devices", [{"path": "/dev/fuse", "type": "c"}], "linux.devices is not supported"),
    ("hooks", {"prestart": [{"path": "true"}]}, "hooks.prestart[0]: path must be an absolute host path"),
    ("hooks", {"prestart": [{"path": "/bin/true", "timeout": 0}]}, "timeout must be a positive number"),
    ("hooks", {"onCreate": [{"path": "/bin/true"}]}, "hooks.onCreate is not an OCI hook stage"),
    ("linux__namespaces", [{"type": "user"}], "linux.namespaces type 'user' is not supported"),
    ("linux__namespaces", [{"type": "network", "path": "netns/x"}], "must be an absolute path"),
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


def test_seccomp_is_ignored_with_a_warning_unless_the_configuration_asks_for_it(tmp_path):
    bundle = _bundle(tmp_path, linux__seccomp={"defaultAction": "SCMP_ACT_ERRNO"})
    assert any("linux.seccomp is ignored ([runtime] disable_guest_seccomp = true" in w
               for w in load_bundle(bundle).warnings)
    with pytest.raises(SpecError, match="linux.seccomp is not supported .*disable_guest_seccomp = false"):
        load_bundle(bundle, SpecPolicy(disable_guest_seccomp=False))


def test_lsm_labels_and_device_rules_are_ignored_and_namespaced_sysctls_kept(tmp_path):
    spec = load_bundle(_bundle(tmp_path, process__apparmorProfile="docker-default",
                               process__selinuxLabel="system_u:system_r:container_t:s0",
                               linux__sysctl={"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shmmax": "1"},
                               linux__resources={"devices": [{"allow": False, "access": "rwm"}]}))
    assert any("process.apparmorProfile is ignored (AppArmor is not applied in the guest" in w for w in spec.warnings)
    assert any("process.selinuxLabel is ignored" in w for w in spec.warnings)
    assert not any("sysctl" in w for w in spec.warnings)  # namespaced: the guest sets them in the container
    assert spec.sysctls == {"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shmmax": "1"}
    assert not any("devices" in w for w in spec.warnings)  # a VM has no host devices to allow or deny


def test_namespace_paths_join_the_network_and_warn_for_the_rest(tmp_path):
    spec = load_bundle(_bundle(tmp_path, linux__namespaces=[
        {"type": "pid", "path": "/proc/42/ns/pid"}, {"type": "network", "path": "/proc/42/ns/net"},
        {"type": "mount"}]))
    assert spec.network_namespace == "/proc/42/ns/net"
    assert any("linux.namespaces pid path /proc/42/ns/pid is ignored (each container is its own VM" in w
               for w in spec.warnings)
    assert load_bundle(str(tmp_path)).network_namespace == "/proc/42/ns/net"
    assert load_bundle(_bundle(tmp_path / "new")).network_namespace == ""  # the default spec: a new one
    host_network = load_bundle(_bundle(tmp_path / "host", linux__namespaces=[{"type": "pid"}]))
    assert host_network.network_namespace is None
    assert any("has no 'network' (host networking)" in w for w in host_network.warnings)


# --- configs as engines write them ------------------------------------------------------------

def _engine_bundle(tmp_path: Path, name: str) -> tuple[str, Path]:
    """The fixture with its host paths made under tmp_path: files with content, dirs, the rootfs."""
    host = tmp_path / "host"
    text = (FIXTURES / f"{name}.config.json").read_text().replace("@HOST@", str(host))
    text = text.replace("@ROOTFS@", str(tmp_path / "rootfs"))
    config = json.loads(text)
    (tmp_path / "rootfs").mkdir(parents=True)
    for mount in config["mounts"]:
        source = mount.get("source", "")
        if source.startswith(str(host)):
            path = Path(source)
            if path.name in ("shm", "data", "kube-api-access"):
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"{path.name} of {name}\n")
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path), host


def _destinations(mounts):
    return sorted(m["destination"] for m in mounts)


def test_a_docker_config_is_accepted_with_its_warnings(tmp_path):
    """dockerd 20.10's config.json for `docker run --runtime kata` on its default bridge network
    (captured from the bundle by //tests/integration:docker_test's set-up)."""
    bundle, host = _engine_bundle(tmp_path, "docker")
    spec = load_bundle(bundle)
    assert spec.network_namespace == ""  # the shim takes a new one for libnetwork to configure
    assert _destinations(spec.host_mounts()) == ["/etc/hostname", "/etc/hosts", "/etc/resolv.conf"]
    (setkey,) = spec.hooks["prestart"]
    assert setkey.path.startswith("/proc/") and setkey.args[0] == "libnetwork-setkey"
    assert set(spec.hooks) == {"prestart"}
    assert sorted(w.split(": ", 1)[1].split(" ")[0] for w in spec.warnings) == [
        "linux.cgroupsPath", "linux.seccomp", "mounts[4]", "process.oomScoreAdj"], spec.warnings
    text = "\n".join(spec.warnings)
    for expected in ("linux.seccomp is ignored", "linux.cgroupsPath is ignored",
                     "/sys/fs/cgroup: cgroup mounts are not supported"):
        assert expected in text
    assert not any("/dev/shm" in w for w in spec.warnings)  # 20.10's default private IPC: a tmpfs
    assert spec.sysctls == {"net.ipv4.ip_unprivileged_port_start": "0", "net.ipv4.ping_group_range": "0 2147483647"}


def test_a_nerdctl_config_with_its_hooks_is_accepted(tmp_path):
    bundle, _ = _engine_bundle(tmp_path, "nerdctl")
    spec = load_bundle(bundle)
    assert spec.network_namespace == ""
    assert set(spec.hooks) == {"createRuntime", "poststop"}
    assert spec.hooks["createRuntime"][0].env == ["PATH=/usr/bin:/bin"]
    data = next(m for m in spec.host_mounts() if m["destination"] == "/data")
    assert data["options"] == ["rbind", "ro"]
    assert _destinations(spec.host_mounts()) == ["/data", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf"]
    assert not any("/dev/shm" in w for w in spec.warnings)  # a tmpfs there is the guest's default
    assert {w.split(": ", 1)[1].split(" ")[0] for w in spec.warnings} == {
        "linux.seccomp", "process.apparmorProfile", "linux.cgroupsPath", "mounts[4]"}


def test_a_cri_pause_and_app_container_are_accepted(tmp_path):
    bundle, host = _engine_bundle(tmp_path / "pause", "cri-pause")
    pause = load_bundle(bundle)
    assert pause.network_namespace == f"{host}/netns/cni-1234"  # CNI's netns: the shim joins it
    assert pause.host_mounts() == [] and pause.rootfs_readonly
    assert any("/dev/shm: the host's shared memory directory" in w for w in pause.warnings)

    bundle, host = _engine_bundle(tmp_path / "app", "cri-app")
    app = load_bundle(bundle)
    assert app.network_namespace == "/proc/4321/ns/net"  # the pause container's shim
    assert (app.vcpus, app.memory_mib) == (1, 256)
    assert _destinations(app.host_mounts()) == ["/dev/termination-log", "/etc/hostname", "/etc/hosts",
                                                "/etc/resolv.conf", "/var/run/secrets/kubernetes.io/serviceaccount"]
    text = "\n".join(app.warnings)
    assert "linux.namespaces ipc path /proc/4321/ns/ipc is ignored" in text
    assert "linux.namespaces uts path /proc/4321/ns/uts is ignored" in text
    assert "linux.namespaces network" not in text
