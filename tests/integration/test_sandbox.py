"""kata-runtime runs OCI bundles in factory VMs: lifecycle, output, exit codes, errors."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from hostos import process
from tests.integration.bundles import make_bundle
from tests.integration.vmtest import write_config

RUNTIME = "runtime/kata-runtime"


def _config(root: str, template: bool = False, cache: int = 0) -> str:
    return write_config(root, template, cache)


class Runtime:
    def __init__(self, root: str, config: str) -> None:
        self.base = [RUNTIME, "--root", os.path.join(root, "state"), "--config", config]

    def __call__(self, *args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
        # Files, not pipes: `create` hands its stdout/stderr to the shim (the container's output
        # goes there, as with runc), so captured pipes would stay open, and the capture wait,
        # until the container is deleted.
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            code = subprocess.run(self.base + list(args), stdout=out, stderr=err, text=True, timeout=timeout).returncode
            out.seek(0)
            err.seek(0)
            done = subprocess.CompletedProcess(self.base + list(args), code, out.read(), err.read())
        if check:
            assert done.returncode == 0, f"{args}: {done.returncode} {done.stderr}"
        return done


@pytest.fixture
def runtime(run_root):
    rt = Runtime(run_root, _config(run_root))
    yield rt
    # Whatever a failing test left: delete --force every container.
    listed = rt("list", "--format", "json")
    for container in json.loads(listed.stdout or "[]"):
        rt("delete", "--force", container["id"])


def test_run_prints_output_and_exits_zero(runtime, run_root):
    bundle = make_bundle(os.path.join(run_root, "b"), ["echo", "hello"])
    done = runtime("run", "c1", "--bundle", bundle)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello\n"


def test_run_returns_the_process_exit_code(runtime, run_root):
    bundle = make_bundle(os.path.join(run_root, "b"), ["sh", "-c", "echo out; echo err >&2; exit 7"])
    done = runtime("run", "c1", "--bundle", bundle)
    assert done.returncode == 7
    assert done.stdout == "out\n" and done.stderr.endswith("err\n")


def test_the_process_runs_on_the_guest_kernel(runtime, run_root):
    bundle = make_bundle(os.path.join(run_root, "b"), ["uname", "-r"])
    done = runtime("run", "c1", "--bundle", bundle)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and done.stdout.strip() != os.uname().release


def test_lifecycle_walks_the_oci_states_and_exec_works(runtime, run_root):
    bundle = make_bundle(os.path.join(run_root, "b"), ["sleep", "600"])
    # not "pid": the leak check takes a dir with one for a VM run dir
    pid_file = os.path.join(run_root, "container.pid")
    runtime("create", "c1", "--bundle", bundle, "--pid-file", pid_file, check=True)
    state = json.loads(runtime("state", "c1", check=True).stdout)
    assert state["status"] == "created" and state["id"] == "c1" and state["bundle"] == bundle
    assert int(Path(pid_file).read_text()) == state["pid"] > 0
    runtime("start", "c1", check=True)
    assert json.loads(runtime("state", "c1").stdout)["status"] == "running"
    done = runtime("exec", "c1", "--", "sh", "-c", "echo from exec; exit 3")
    assert done.returncode == 3 and done.stdout == "from exec\n"
    assert "c1" in runtime("list").stdout
    refused = runtime("delete", "c1")
    assert refused.returncode != 0 and "running" in refused.stderr
    runtime("kill", "c1", "KILL", check=True)
    deadline = time.monotonic() + 30
    while json.loads(runtime("state", "c1").stdout)["status"] != "stopped":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    runtime("delete", "c1", check=True)
    assert runtime("state", "c1").returncode != 0


def test_delete_force_removes_a_running_container(runtime, run_root):
    bundle = make_bundle(os.path.join(run_root, "b"), ["sleep", "600"])
    runtime("create", "c1", "--bundle", bundle, check=True)
    runtime("start", "c1", check=True)
    runtime("delete", "--force", "c1", check=True)
    assert not process.pids_mentioning(run_root + "/vm/")


def test_two_containers_run_at_once_in_two_vms(runtime, run_root):
    for name in ("a", "b"):
        runtime("create", name, "--bundle", make_bundle(os.path.join(run_root, name), ["sleep", "600"]), check=True)
        runtime("start", name, check=True)
    vms = {json.loads(runtime("state", n).stdout)["annotations"]["io.katacontainers.vm.id"] for n in ("a", "b")}
    assert len(vms) == 2
    for name in ("a", "b"):
        runtime("delete", "--force", name, check=True)


@pytest.mark.parametrize("breakage,message", [
    ("no-config", "has no config.json"),
    ("bad-json", "is not valid JSON"),
    ("bad-version", "ociVersion '0.9' is not supported"),
    ("no-rootfs", "is not a directory"),
    ("no-such-binary", "'nonexistent-binary' not found in the rootfs"),
])
def test_bad_bundles_fail_in_one_line_before_any_vm(runtime, run_root, breakage, message):
    bundle = make_bundle(os.path.join(run_root, "b"),
                         ["nonexistent-binary" if breakage == "no-such-binary" else "true"])
    config = Path(bundle, "config.json")
    if breakage == "no-config":
        config.unlink()
    elif breakage == "bad-json":
        config.write_text("{not json")
    elif breakage == "bad-version":
        config.write_text(json.dumps({**json.loads(config.read_text()), "ociVersion": "0.9"}))
    elif breakage == "no-rootfs":
        os.rename(os.path.join(bundle, "rootfs"), os.path.join(bundle, "elsewhere"))
    done = runtime("create", "c1", "--bundle", bundle)
    assert done.returncode != 0
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not process.pids_mentioning(run_root + "/vm/")


def test_duplicate_and_unknown_ids_are_refused(runtime, run_root):
    bundle = make_bundle(os.path.join(run_root, "b"), ["sleep", "600"])
    runtime("create", "c1", "--bundle", bundle, check=True)
    again = runtime("create", "c1", "--bundle", bundle)
    assert again.returncode != 0 and "already exists" in again.stderr
    unknown = runtime("start", "nope")
    assert unknown.returncode != 0 and "does not exist" in unknown.stderr
    runtime("delete", "--force", "c1", check=True)


@pytest.mark.parametrize("path", ["template", "vmcache"])
def test_each_factory_path_runs_a_container(run_root, path):
    config = _config(run_root, template=True, cache=1 if path == "vmcache" else 0)
    rt = Runtime(run_root, config)
    server = None
    if path == "vmcache":
        server = subprocess.Popen(["vmcache/server", "--config", config], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while "VM pid" not in rt("factory", "status").stdout:
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.2)
    try:
        bundle = make_bundle(os.path.join(run_root, "b"), ["echo", "hi"])
        done = rt("--debug", "run", "c1", "--bundle", bundle)
        assert done.returncode == 0 and done.stdout == "hi\n", done.stderr
        assert f"factory path {path}" in done.stderr
    finally:
        if server is not None:
            rt("factory", "destroy")
            server.wait(60)
        else:
            rt("factory", "destroy", check=True)
