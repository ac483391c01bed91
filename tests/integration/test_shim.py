"""The shim under load and under faults: exit codes and output arrive exact, a slow reader slows
the process instead of losing data, and a dead VM or shim is noticed and cleaned up.

One template (made by the first sandbox, the runtime's fallback) serves every test in this
module, so each sandbox is a clone; whatever a test leaves behind fails it.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import tempfile
import termios
from pathlib import Path

import pytest

from hostos import process
from tests.integration.bundles import make_bundle
from tests.integration.vmtest import clean_up_root, mounts_under, short_tempdir, wait_for, write_config

RUNTIME = os.path.abspath("runtime/kata-runtime")
# The data the big-output tests send: random, so any lost, doubled or reordered chunk shows.
BLOCK_BYTES = 1 << 20
# Everything waited for here is bounded; a TCG guest on a loaded 2-core machine is slow.
DEADLINE_S = 120.0
# Noticing a dead VM is "within seconds"; this bound only keeps a hang from hanging the suite.
DEATH_NOTICED_S = 30.0
# What the shim may hold beyond its size at rest while a reader stalls: the agent client's event
# queue (256 chunks of at most 64 KiB) and socket buffers. Unbounded buffering of 256 MiB would
# blow far past it.
SHIM_GROWTH_BOUND_KIB = 64 * 1024


class Kata:
    """kata-runtime with this module's root and configuration."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.state_root = os.path.join(root, "state")
        self.config = write_config(root, template=True, cache=0)
        self.base = [RUNTIME, "--root", self.state_root, "--config", self.config]

    def __call__(self, *args: str, timeout: float = DEADLINE_S) -> subprocess.CompletedProcess:
        # Files, not pipes: `create` hands its stdout to the shim, which keeps a pipe open.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            code = subprocess.run(self.base + list(args), stdout=out, stderr=err, timeout=timeout).returncode
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(args, code, out.read(), err.read().decode())

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.base + list(args), **kwargs)

    def state(self, container_id: str) -> dict:
        done = self("state", container_id)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def saved_state(self, container_id: str) -> dict:
        """The shim's own record (pids of the shim and of QEMU), which `state` does not print."""
        try:
            return json.loads(Path(self.state_root, container_id, "state.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}  # not written yet, or being replaced

    def running(self, container_id: str, bundle: str) -> None:
        for command in (["create", container_id, "--bundle", bundle], ["start", container_id]):
            done = self(*command)
            assert done.returncode == 0, f"{command}: {done.stderr}"


@pytest.fixture(scope="module")
def kata():
    root = short_tempdir("kS-")
    runtime = Kata(root)
    try:
        yield runtime
    finally:
        runtime("factory", "destroy")
        leaks = clean_up_root(root)
        assert not leaks, "the module leaked: " + "; ".join(leaks)


@pytest.fixture
def bundle(kata, request):
    """A busybox bundle with /r, one block of random bytes; returns (path, the block)."""
    path = os.path.join(kata.root, "bundles", request.node.name)
    make_bundle(path, ["sleep", "600"])
    for applet in ("seq", "yes", "head"):
        os.symlink("/bin/busybox", os.path.join(path, "rootfs", "bin", applet))
    block = os.urandom(BLOCK_BYTES)
    Path(path, "rootfs", "r").write_bytes(block)
    return path, block


@pytest.fixture(autouse=True)
def nothing_left(kata):
    """After each test: no container, no lock file, no VM process, mount or run directory."""
    yield
    leftovers = os.listdir(kata.state_root) if os.path.isdir(kata.state_root) else []
    for name in leftovers:
        if not name.endswith(".lock"):
            kata("delete", "--force", name)
    vm_root = os.path.join(kata.root, "vm")
    vms = process.pids_mentioning(vm_root + "/")
    run_dirs = os.listdir(vm_root) if os.path.isdir(vm_root) else []
    assert not leftovers and not vms and not mounts_under(vm_root) and not run_dirs, (
        f"left behind: state {leftovers}, QEMU pids {vms}, run dirs {run_dirs}")


def _sh(script: str) -> list[str]:
    return ["--", "sh", "-c", script]


def _set_args(bundle: str, args: list[str]) -> None:
    config = json.loads(Path(bundle, "config.json").read_text())
    config["process"]["args"] = args
    Path(bundle, "config.json").write_text(json.dumps(config))



def _with_vm(state: dict) -> dict | None:
    return state if state.get("vm") else None


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _bytes_in_pipe(fd: int) -> int:
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), "little")


# ---- data ---------------------------------------------------------------------


def test_back_to_back_exec_and_run_return_exactly_the_chosen_exit_codes(kata, bundle, monkeypatch):
    path, _ = bundle
    kata.running("c1", path)
    for i in range(190):
        code = (i * 37) % 256  # every kind of status, 0 and 255 included
        done = kata("exec", "c1", *_sh(f"echo {i}; exit {code}"))
        assert (done.returncode, done.stdout) == (code, f"{i}\n".encode()), done.stderr
    assert kata("delete", "--force", "c1").returncode == 0
    # Some runs, one of them with a relative --root (the shim runs in "/": it must be made absolute).
    for i, code in enumerate([0, 1, 3, 42, 127, 128, 200, 254, 255]):
        _set_args(path, ["sh", "-c", f"echo run {i}; exit {code}"])
        done = kata("run", f"r{i}", "--bundle", path)
        assert (done.returncode, done.stdout) == (code, f"run {i}\n".encode()), done.stderr
    monkeypatch.chdir(kata.root)
    relative = subprocess.run([RUNTIME, "--root", "state", "--config", kata.config, "run", "rel", "--bundle", path],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=DEADLINE_S)
    assert relative.returncode == 255 and relative.stdout == b"run 8\n", relative.stderr


def test_256_mib_through_exec_into_a_slow_reader_arrive_byte_exact(kata, bundle):
    path, block = bundle
    blocks = 256
    kata.running("c1", path)
    shim = kata.saved_state("c1")["shim_pid"]
    at_rest = _rss_kib(shim)
    exec_ = kata.popen("exec", "c1", *_sh(f"for i in $(seq {blocks}); do cat /r; done"),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = exec_.stdout.fileno()
        # The reader stalls until its pipe is full: from then on everything upstream must wait,
        # not buffer: the shim stays small and the process in the guest does not finish.
        wait_for("the reader's pipe to fill", lambda: _bytes_in_pipe(out) >= 65536, DEADLINE_S)
        assert exec_.poll() is None
        assert _rss_kib(shim) - at_rest < SHIM_GROWTH_BOUND_KIB
        digest, received, most = hashlib.sha256(), 0, 0
        while chunk := os.read(out, 4096):  # small reads: a slow reader
            digest.update(chunk)
            received += len(chunk)
            if received % (16 << 20) < 4096:
                most = max(most, _rss_kib(shim) - at_rest)
        assert exec_.wait(DEADLINE_S) == 0, exec_.stderr.read()
    finally:
        if exec_.poll() is None:
            exec_.kill()
            exec_.wait()
        exec_.stdout.close()
        exec_.stderr.close()
    assert received == blocks * BLOCK_BYTES
    assert digest.hexdigest() == hashlib.sha256(block * blocks).hexdigest()
    assert most < SHIM_GROWTH_BOUND_KIB, f"the shim grew by {most} KiB while relaying"
    assert kata("delete", "--force", "c1").returncode == 0


def test_multi_megabyte_output_of_run_is_exact(kata, bundle):
    path, block = bundle
    _set_args(path, ["sh", "-c", "for i in $(seq 12); do cat /r; done; echo done >&2; exit 9"])
    done = kata("run", "r1", "--bundle", path)
    assert done.returncode == 9, done.stderr
    assert hashlib.sha256(done.stdout).hexdigest() == hashlib.sha256(block * 12).hexdigest()
    assert done.stderr.endswith("done\n")


def test_a_reader_that_goes_away_gives_the_writer_sigpipe(kata, bundle):
    path, _ = bundle
    kata.running("c1", path)
    exec_ = kata.popen("exec", "c1", "--", "yes", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert exec_.stdout.read(4096) == b"y\n" * 2048
    exec_.stdout.close()  # as `| head` does
    assert exec_.wait(DEADLINE_S) == 128 + signal.SIGPIPE
    # The container itself is unharmed and still answers.
    assert kata("exec", "c1", *_sh("exit 4")).returncode == 4
    assert kata("delete", "--force", "c1").returncode == 0


# ---- faults -------------------------------------------------------------------


def test_sigkill_of_a_running_containers_qemu_is_noticed_and_cleaned_up(kata, bundle):
    path, _ = bundle
    kata.running("c1", path)
    waiting = kata.popen("wait", "c1", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    os.kill(kata.saved_state("c1")["vm"]["pid"], signal.SIGKILL)
    _, err = waiting.communicate(timeout=DEATH_NOTICED_S)
    assert waiting.returncode != 0 and "its VM exited" in err
    state = kata.state("c1")
    assert state["status"] == "stopped" and "its VM exited" in state["reason"]
    refused = kata("exec", "c1", "--", "true", timeout=DEATH_NOTICED_S)
    assert refused.returncode != 0 and "its VM exited" in refused.stderr
    assert kata("delete", "c1").returncode == 0
    assert kata("state", "c1").returncode != 0


def test_sigkill_of_qemu_under_run_and_exec_ends_them_with_an_error(kata, bundle):
    path, _ = bundle
    _set_args(path, ["sleep", "600"])
    with tempfile.TemporaryFile() as out:
        run = kata.popen("run", "r1", "--bundle", path, stdout=out, stderr=subprocess.PIPE, text=True)
        wait_for("the container to run", lambda: kata.saved_state("r1").get("status") == "running", DEADLINE_S)
        exec_ = kata.popen("exec", "r1", *_sh("echo started; sleep 600"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
        assert exec_.stdout.readline() == "started\n"
        os.kill(kata.saved_state("r1")["vm"]["pid"], signal.SIGKILL)
        _, run_err = run.communicate(timeout=DEATH_NOTICED_S)
        _, exec_err = exec_.communicate(timeout=DEATH_NOTICED_S)
    assert run.returncode != 0 and "its VM exited" in run_err
    assert exec_.returncode != 0 and "its VM exited" in exec_err
    # run deleted the container on its way out.
    assert kata("state", "r1").returncode != 0


def test_sigkill_of_the_shim_and_its_caller_during_create_then_delete_force_leaves_nothing(kata, bundle):
    path, _ = bundle
    create = kata.popen("create", "c1", "--bundle", path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Once the shim has recorded its VM, mid-create (process not made yet).
    recorded = wait_for("the shim to record its VM", lambda: _with_vm(kata.saved_state("c1")), DEADLINE_S)
    assert recorded["status"] == "creating"
    create.kill()
    create.wait()
    os.kill(recorded["shim_pid"], signal.SIGKILL)
    assert process.wait_gone(recorded["shim_pid"], recorded["shim_start_time"], DEADLINE_S)
    done = kata("delete", "--force", "c1")
    assert done.returncode == 0, done.stderr
    assert not process.is_alive(recorded["vm"]["pid"], recorded["vm"]["pid_start_time"])
    assert kata("state", "c1").returncode != 0


def test_delete_force_during_create_leaves_nothing(kata, bundle):
    path, _ = bundle
    create = kata.popen("create", "c1", "--bundle", path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("create to begin", lambda: os.path.isdir(os.path.join(kata.state_root, "c1")), DEADLINE_S)
        # Waits for create (the container's lock), then removes what it made.
        done = kata("delete", "--force", "c1")
        assert done.returncode == 0, done.stderr
    finally:
        create.communicate(timeout=DEADLINE_S)
    assert kata("state", "c1").returncode != 0
    assert not os.path.exists(os.path.join(kata.state_root, "c1.lock"))
