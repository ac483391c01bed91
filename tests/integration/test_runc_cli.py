"""kata-runtime driven exactly as containerd's runc shim (go-runc) drives runc.

The test process plays containerd-shim-runc-v2: it is a child subreaper (PR_SET_CHILD_SUBREAPER),
runs every command with the global flags first (`--root R --log B/log.json --log-format json
--systemd-cgroup`), gives `create` and `exec` pipes as stdio, reads pids from --pid-file, reaps
those host pids to learn exit statuses, kills an exec by signalling its pid, and reads the
reason of a failed command from the last "error" line of log.json.

One template (made by the first sandbox) serves every test in this module; whatever a test leaves
behind fails it.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from hostos import process
from runtime.runtime_log import last_error
from runtime.warm import address
from tests.integration.bundles import make_bundle
from tests.integration.vmtest import clean_up_root, mounts_under, short_tempdir, wait_for, write_config

RUNTIME = os.path.abspath("runtime/kata-runtime")
# Everything waited for here is bounded; a TCG guest on a loaded 2-core machine is slow.
DEADLINE_S = 180.0
PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _reap(pid: int) -> int:
    """waitpid as containerd's reaper does it: the exit status, or 128 + the killing signal."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


class Engine:
    """The commands of go-runc, with this module's root and configuration."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.state_root = os.path.join(root, "state")
        self.config = write_config(root, template=True, cache=0)

    def argv(self, bundle: str, *args: str) -> list[str]:
        # --config is this project's (containerd's launcher script would set KATA_CONF_FILE).
        return [RUNTIME, "--config", self.config, "--root", self.state_root, "--log",
                os.path.join(bundle, "log.json"), "--log-format", "json", "--systemd-cgroup", *args]

    def run(self, bundle: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(bundle, *args), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=DEADLINE_S)

    def check(self, bundle: str, *args: str) -> str:
        done = self.run(bundle, *args)
        assert done.returncode == 0, f"{args}: {done.stderr}"
        return done.stdout

    def state(self, bundle: str, container_id: str) -> dict:
        return json.loads(self.check(bundle, "state", container_id))


class Stdio:
    """Three pipes, as containerd's createIO makes them: the command gets one end of each."""

    def __init__(self) -> None:
        self.stdin_r, self.stdin_w = os.pipe()
        self.stdout_r, self.stdout_w = os.pipe()
        self.stderr_r, self.stderr_w = os.pipe()

    def start(self, argv: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdin=self.stdin_r, stdout=self.stdout_w, stderr=self.stderr_w)
        for fd in (self.stdin_r, self.stdout_w, self.stderr_w):  # CloseAfterStart
            os.close(fd)
        return proc

    def write(self, data: bytes) -> None:
        os.write(self.stdin_w, data)

    def close_stdin(self) -> None:
        os.close(self.stdin_w)

    def read_line(self) -> bytes:
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(self.stdout_r, 1)
            assert chunk, f"stdout ended after {line!r}"
            line += chunk
        return line

    def rest(self) -> tuple[bytes, bytes]:
        """Everything left on stdout and stderr, to end of file (every writer gone)."""
        out = b"".join(iter(lambda: os.read(self.stdout_r, 65536), b""))
        err = b"".join(iter(lambda: os.read(self.stderr_r, 65536), b""))
        return out, err

    def close(self) -> None:
        for fd in (self.stdin_w, self.stdout_r, self.stderr_r):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture(scope="module")
def engine():
    _become_subreaper()
    root = short_tempdir("kR-")
    runtime = Engine(root)
    try:
        yield runtime
    finally:
        subprocess.run([RUNTIME, "--config", runtime.config, "factory", "destroy"], capture_output=True)
        leaks = clean_up_root(root)
        assert not leaks, "the module leaked: " + "; ".join(leaks)


@pytest.fixture
def bundle(engine, request):
    path = os.path.join(engine.root, "bundles", request.node.name)
    make_bundle(path, ["sh", "-c", "echo ready; read line; echo \"init got $line\"; echo to-stderr >&2; "
                                   "exec sleep 600"])
    return path


@pytest.fixture(autouse=True)
def nothing_left(engine):
    """After each test: no container state, no QEMU, no mount, no VM run directory."""
    yield
    state = sorted(os.listdir(engine.state_root)) if os.path.isdir(engine.state_root) else []
    vm_root = os.path.join(engine.root, "vm")
    vms = process.pids_mentioning(vm_root + "/")
    run_dirs = os.listdir(vm_root) if os.path.isdir(vm_root) else []
    assert not [s for s in state if not s.endswith(".lock")] and not vms and not mounts_under(vm_root) \
        and not run_dirs, f"left behind: state {state}, QEMU pids {vms}, run dirs {run_dirs}"


def _process_json(bundle: str, name: str, args: list[str]) -> str:
    path = os.path.join(bundle, f"{name}.json")
    Path(path).write_text(json.dumps({"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args,
                                      "env": ["PATH=/bin"], "cwd": "/"}))
    return path


def _exec(engine: Engine, bundle: str, container_id: str, name: str, args: list[str]) -> tuple[int, Stdio]:
    """`exec --process --detach --pid-file` with pipes; returns the holder's pid and its stdio."""
    stdio = Stdio()
    pid_file = os.path.join(bundle, f"{name}.pid")
    command = stdio.start(engine.argv(bundle, "exec", "--process", _process_json(bundle, name, args), "--detach",
                                      "--pid-file", pid_file, container_id))
    assert command.wait(DEADLINE_S) == 0, last_error(os.path.join(bundle, "log.json"))
    return int(Path(pid_file).read_text()), stdio


def test_the_lifecycle_as_containerd_drives_it(engine, bundle):
    log = os.path.join(bundle, "log.json")
    pid_file = os.path.join(bundle, "init.pid")
    init = Stdio()
    create = init.start(engine.argv(bundle, "create", "--bundle", bundle, "--pid-file", pid_file, "c1"))
    try:
        assert create.wait(DEADLINE_S) == 0, last_error(log)
        shim = int(Path(pid_file).read_text())  # no newline: go-runc parses the whole file
        assert process.start_time(shim) is not None

        state = engine.state(bundle, "c1")
        assert (state["status"], state["pid"], state["bundle"], state["owner"]) == ("created", shim, bundle, "")
        assert state["rootfs"] == os.path.join(bundle, "rootfs")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", state["created"]), state["created"]
        assert int(state["annotations"]["io.katacontainers.pid.guest"]) > 0

        engine.check(bundle, "start", "c1")
        assert engine.state(bundle, "c1")["status"] == "running"
        assert init.read_line() == b"ready\n"
        init.write(b"hello\n")  # the container's stdin is create's
        assert init.read_line() == b"init got hello\n"

        # An exec with its own pipes, exit status through the holder's pid.
        holder, stdio = _exec(engine, bundle, "c1", "e1", ["sh", "-c", "read x; echo \"exec got $x\"; exit 3"])
        stdio.write(b"abc\n")
        assert stdio.read_line() == b"exec got abc\n"
        assert _reap(holder) == 3
        assert stdio.rest() == (b"", b"")
        stdio.close()

        # Execs killed the way containerd kills them: a signal to the holder's pid.
        terminated, stdio_t = _exec(engine, bundle, "c1", "e2", ["sleep", "600"])
        killed, stdio_k = _exec(engine, bundle, "c1", "e3", ["sleep", "600"])
        pids = json.loads(engine.check(bundle, "ps", "--format", "json", "c1"))
        assert sorted(pids) == sorted([shim, terminated, killed])
        os.kill(terminated, signal.SIGTERM)  # forwarded to the process in the guest
        assert _reap(terminated) == 128 + signal.SIGTERM
        os.kill(killed, signal.SIGKILL)  # the holder dies; the shim kills the process
        assert _reap(killed) == 128 + signal.SIGKILL
        wait_for("the killed exec to be gone from ps",
                 lambda: json.loads(engine.check(bundle, "ps", "--format", "json", "c1")) == [shim], DEADLINE_S)
        for stdio in (stdio_t, stdio_k):
            stdio.close()

        # The container's process, by signal number: the shim exits with its status.
        engine.check(bundle, "kill", "c1", "15")
        assert _reap(shim) == 128 + signal.SIGTERM
        out, err = init.rest()
        assert (out, err) == (b"", b"to-stderr\n")
        state = engine.state(bundle, "c1")
        assert (state["status"], state["pid"]) == ("stopped", 0)

        # containerd's kill --all after the process exits, and runc's wording for a plain kill.
        engine.check(bundle, "kill", "--all", "c1", "9")
        refused = engine.run(bundle, "kill", "c1", "9")
        assert refused.returncode == 1 and "container not running" in refused.stderr
        assert "container not running" in last_error(log)

        engine.check(bundle, "delete", "c1")
        gone = engine.run(bundle, "state", "c1")
        assert gone.returncode == 1 and "does not exist" in last_error(log)
    finally:
        init.close()
        if create.poll() is None:
            create.kill()
        engine.run(bundle, "delete", "--force", "c1")


def test_delete_of_a_created_container_ends_its_process_as_killed(engine, bundle):
    pid_file = os.path.join(bundle, "init.pid")
    init = Stdio()
    create = init.start(engine.argv(bundle, "create", "--bundle", bundle, "--pid-file", pid_file, "c2"))
    try:
        assert create.wait(DEADLINE_S) == 0, last_error(os.path.join(bundle, "log.json"))
        shim = int(Path(pid_file).read_text())
        engine.check(bundle, "delete", "c2")
        assert _reap(shim) == 128 + signal.SIGKILL
    finally:
        init.close()
        engine.run(bundle, "delete", "--force", "c2")


def _create_warm(engine: Engine, bundle: str, container_id: str) -> tuple[int, dict, Stdio, subprocess.Popen]:
    """`create` once the warm server of the engine's root is up: (the pid-file pid, the saved
    state, the container's stdio, the create command)."""
    wait_for("the warm server", lambda: engine.check(bundle, "list") is not None and os.path.exists(
        address.socket_path(engine.state_root, os.path.abspath("."))), DEADLINE_S)
    pid_file = os.path.join(bundle, f"{container_id}.pid")
    init = Stdio()
    create = init.start(engine.argv(bundle, "create", "--bundle", bundle, "--pid-file", pid_file, container_id))
    assert create.wait(DEADLINE_S) == 0, last_error(os.path.join(bundle, "log.json"))
    saved = json.loads(Path(engine.state_root, container_id, "state.json").read_text())
    return int(Path(pid_file).read_text()), saved, init, create


def test_a_warm_shims_anchor_is_the_containers_process(engine, bundle):
    """Run warm, the shim is the warm server's child; the process engines know and reap is its
    anchor, the create command's child: it exits with the container's status, and killing it
    stops the container, as killing runc's process does."""
    make_bundle(bundle + "-exit", ["sh", "-c", "read x; exit 7"])
    anchor, saved, init, _ = _create_warm(engine, bundle + "-exit", "c5")
    try:
        assert saved["anchor_pid"] == anchor != saved["shim_pid"] > 0
        engine.check(bundle, "start", "c5")
        init.write(b"go\n")
        assert _reap(anchor) == 7
        engine.check(bundle, "delete", "c5")
    finally:
        init.close()
        engine.run(bundle, "delete", "--force", "c5")

    anchor, saved, init, _ = _create_warm(engine, bundle, "c6")
    try:
        engine.check(bundle, "start", "c6")
        assert init.read_line() == b"ready\n"
        os.kill(anchor, signal.SIGKILL)
        assert _reap(anchor) == 128 + signal.SIGKILL
        wait_for("the container to stop with its anchor",
                 lambda: engine.state(bundle, "c6")["status"] == "stopped", DEADLINE_S)
        assert process.wait_gone(saved["shim_pid"], saved["shim_start_time"], DEADLINE_S)
        engine.check(bundle, "delete", "c6")
    finally:
        init.close()
        engine.run(bundle, "delete", "--force", "c6")


def test_kill_all_reaches_the_execs_and_errors_keep_runcs_words(engine, bundle):
    log = os.path.join(bundle, "log.json")
    pid_file = os.path.join(bundle, "init.pid")
    init = Stdio()
    create = init.start(engine.argv(bundle, "create", "--bundle", bundle, "--pid-file", pid_file, "c3"))
    try:
        assert create.wait(DEADLINE_S) == 0, last_error(log)
        shim = int(Path(pid_file).read_text())
        engine.check(bundle, "start", "c3")
        holder, stdio = _exec(engine, bundle, "c3", "e1", ["sleep", "600"])
        engine.check(bundle, "kill", "--all", "c3", "KILL")
        assert _reap(holder) == 128 + signal.SIGKILL
        assert _reap(shim) == 128 + signal.SIGKILL
        stdio.close()
        engine.check(bundle, "delete", "c3")
        for command in (["kill", "c3", "9"], ["delete", "c3"], ["start", "c3"], ["ps", "--format", "json", "c3"]):
            done = engine.run(bundle, *command)
            assert done.returncode == 1 and "does not exist" in done.stderr, command
            assert "does not exist" in last_error(log)
        engine.check(bundle, "delete", "--force", "c3")  # again, as containerd's cleanup does: no error
        unknown = engine.run(bundle, "--no-such-flag", "state", "c3")
        assert unknown.returncode == 1 and "unknown flag --no-such-flag" in unknown.stderr
    finally:
        init.close()
        engine.run(bundle, "delete", "--force", "c3")


def test_pause_resume_update_ps_table_and_foreground_execs(engine, bundle):
    log = os.path.join(bundle, "log.json")
    pid_file = os.path.join(bundle, "init.pid")
    init = Stdio()
    create = init.start(engine.argv(bundle, "create", "--bundle", bundle, "--pid-file", pid_file, "c4"))
    try:
        assert create.wait(DEADLINE_S) == 0, last_error(log)
        shim = int(Path(pid_file).read_text())
        engine.check(bundle, "start", "c4")
        assert init.read_line() == b"ready\n"

        engine.check(bundle, "pause", "c4")
        assert engine.state(bundle, "c4")["status"] == "paused"
        refused = engine.run(bundle, "exec", "c4", "true")
        assert refused.returncode == 1 and "container not running" in refused.stderr
        engine.check(bundle, "resume", "c4")
        assert engine.state(bundle, "c4")["status"] == "running"

        update = subprocess.run(engine.argv(bundle, "update", "--resources", "-", "c4"), input='{"cpu": {}}',
                                capture_output=True, text=True, timeout=DEADLINE_S)
        # With --log, a warning goes to the log only, as runc's (create's stderr is the container's).
        assert update.returncode == 0 and update.stderr == ""
        warnings = [json.loads(line) for line in Path(log).read_text().splitlines()]
        assert any(w["level"] == "warning" and "not applied" in w["msg"] for w in warnings)

        # Foreground execs: runc's `exec ID CMD ARGS` and `exec --process F`, exit status as our own.
        done = engine.run(bundle, "exec", "c4", "sh", "-c", "echo out; exit 5")
        assert (done.returncode, done.stdout) == (5, "out\n"), done.stderr
        process_file = _process_json(bundle, "fg", ["sh", "-c", "echo \"$X in $PWD\"; exit 6"])
        done = engine.run(bundle, "exec", "--process", process_file, "--cwd", "/tmp", "--env", "X=x1", "c4")
        assert (done.returncode, done.stdout) == (6, "x1 in /tmp\n"), done.stderr
        tty = engine.run(bundle, "exec", "--tty", "c4", "sh")
        assert tty.returncode == 1 and "terminal" in tty.stderr and "terminal" in last_error(log)

        table = engine.check(bundle, "ps", "c4").splitlines()
        assert "PID" in table[0].split() and [int(row.split()[1]) for row in table[1:]] == [shim]

        engine.check(bundle, "delete", "--force", "c4")
        assert _reap(shim) == 128 + signal.SIGKILL
    finally:
        init.close()
        engine.run(bundle, "delete", "--force", "c4")


def test_version_and_features_are_runcs_documents(engine, tmp_path):
    lines = subprocess.run([RUNTIME, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines[0].startswith("kata-runtime version ") and lines[2].startswith("spec: 1.0")
    document = json.loads(subprocess.run([RUNTIME, "features"], capture_output=True, text=True, check=True).stdout)
    assert document["ociVersionMax"].startswith("1.0") and "pid" in document["linux"]["namespaces"]
