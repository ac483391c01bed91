"""The host's side of a container (no VM): host binds shared with the VM's share, the shim's network
namespace, hooks in the host's namespace."""
from __future__ import annotations

import json
import os
import stat

import pytest

from factory.hypervisor.rundir import RunDir
from hostos import mountinfo, netns
from runtime.oci.spec import default_spec, load_bundle
from runtime.sandbox import hostside

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting and namespaces need root")


@pytest.fixture
def run(tmp_path):
    run = RunDir(tmp_path / "vms", "vm1")
    run.create()
    yield run
    run.remove()


def _spec(tmp_path, mounts=(), **linux):
    (tmp_path / "b" / "rootfs").mkdir(parents=True)
    config = default_spec()
    config["mounts"] += list(mounts)
    config["linux"].update(linux)
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    return load_bundle(str(tmp_path / "b"))


def test_host_files_and_directories_reach_the_share_as_the_mount_asks(run, tmp_path):
    host = tmp_path / "host"
    (host / "vol").mkdir(parents=True)
    (host / "resolv.conf").write_text("nameserver 10.0.0.1\n")
    (host / "termination-log").write_text("")
    spec = _spec(tmp_path, mounts=[
        {"destination": "/etc/resolv.conf", "type": "bind", "source": str(host / "resolv.conf"), "options": ["ro"]},
        {"destination": "/dev/termination-log", "type": "bind", "source": str(host / "termination-log"),
         "options": ["rbind", "rw"]},
        {"destination": "/vol", "type": "bind", "source": str(host / "vol"), "options": ["rbind", "ro"]}])
    recorded: list = []
    guest = hostside.HostSide(spec, "c1").share_mounts(run, recorded)
    shared = [m for m in guest if m.get("shared")]
    assert [m["source"] for m in shared] == [f"/run/kata-containers/shared/c1/mounts/{i}" for i in (0, 1, 2)]
    # The read-only small file is a copy in the host-only view: no mount, no way back to the host file.
    copy = run.shared_dir / "c1" / "mounts" / "0"
    assert copy.read_text() == "nameserver 10.0.0.1\n" and not os.path.ismount(copy)
    assert [r[0] for r in recorded] == [str(run.shared_dir / "c1" / "mounts" / i) for i in ("1", "2")]
    log_mount, vol_mount = (mountinfo.by_id(r[1]) for r in recorded)
    assert {"rw", "nosuid", "nodev"} <= set(log_mount.options.split(","))
    assert {"ro", "nosuid", "nodev"} <= set(vol_mount.options.split(","))
    (run.shared_dir / "c1" / "mounts" / "1").write_text("done\n")  # rw: as the spec asked
    assert (host / "termination-log").read_text() == "done\n"
    hostside.unbind_all(recorded)
    assert all(mountinfo.by_id(r[1]) is None for r in recorded)


def test_the_shim_gets_a_new_network_namespace_and_hooks_run_in_the_hosts(tmp_path):
    out = tmp_path / "hook.out"
    hook = tmp_path / "hook"
    hook.write_text(f"#!/bin/sh\nreadlink /proc/self/ns/net > {out}\ncat >> {out}\n")
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    spec = _spec(tmp_path, hooks=None)
    raw = json.loads((tmp_path / "b" / "config.json").read_text())
    raw["hooks"] = {"createRuntime": [{"path": str(hook)}]}
    (tmp_path / "b" / "config.json").write_text(json.dumps(raw))
    spec = load_bundle(str(tmp_path / "b"))
    assert spec.network_namespace == ""
    host_ns = netns.current_id()
    pid = os.fork()
    if pid == 0:  # the namespace change must not reach the test process
        code = 1
        try:
            import asyncio
            side = hostside.HostSide(spec, "c1")
            side.enter_network_namespace()
            assert netns.current_id() != host_ns
            asyncio.run(side.run_hooks("createRuntime", "creating", fatal=True))
            (tmp_path / "shim.ns").write_text(netns.current_id())
            code = 0
        except BaseException:
            import traceback
            (tmp_path / "child.err").write_text(traceback.format_exc())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, (tmp_path / "child.err").read_text()
    hook_ns, state = out.read_text().split("\n", 1)
    assert hook_ns == host_ns != (tmp_path / "shim.ns").read_text()
    assert json.loads(state) | {"pid": 0} == {"ociVersion": "1.0.2", "id": "c1", "status": "creating", "pid": 0,
                                              "bundle": str(tmp_path / "b"), "annotations": {}}
    assert json.loads(state)["pid"] == pid


def test_a_shim_joins_the_network_namespace_config_json_names(tmp_path):
    """CRI: an app container's shim joins /proc/<pause shim pid>/ns/net."""
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pause = os.fork()
    if pause == 0:  # the pause container's shim: a namespace of its own, held while it lives
        os.close(ready_r)
        os.close(stop_w)
        netns.enter("")
        os.write(ready_w, netns.current_id().encode())
        os.read(stop_r, 1)
        os._exit(0)
    os.close(ready_w)
    os.close(stop_r)
    try:
        pause_ns = os.read(ready_r, 100).decode()
        spec = _spec(tmp_path, namespaces=[{"type": "network", "path": f"/proc/{pause}/ns/net"}])
        app = os.fork()
        if app == 0:
            ok = False
            try:
                hostside.HostSide(spec, "app").enter_network_namespace()
                ok = netns.current_id() == pause_ns
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(app, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert netns.current_id() != pause_ns  # the test process never moved
    finally:
        os.close(stop_w)
        os.waitpid(pause, 0)
        os.close(ready_r)
