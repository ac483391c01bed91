"""containerd drives the installed kata-runtime through its own runc shim, as a node would.

Each test starts a private containerd with deploy/containerd/config.toml (the file
docs/kubernetes.md installs) and runs the locally built busybox image with
`ctr run --runc-binary <prefix>/bin/kata-runtime`, the runtime installed by //:install into a
temporary prefix. The runtime's configuration reaches it as $KATA_CONF_FILE in containerd's
environment (containerd-shim-runc-v2 passes its environment on to the runtime binary), and keeps
every VM, socket and template under the test's run root. Each test ends with nothing left: no
container, task, shim, runtime state, mount or VM.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from hostos.process import pids_mentioning
from tests.integration.containerd import (
    Containerd,
    installed_prefix,
    kata_config,
    missing,
    render_config,
    runtime_binary,
)
from tests.integration.terminal import DEFAULT_SIZE, Terminal
from tests.integration.vmtest import mounts_under, wait_for

pytestmark = pytest.mark.skipif(bool(missing()), reason=missing())

# Bounded waits for what other processes do: a task's state, the pool's VM, a task's start.
TASK_TIMEOUT_S = 60.0
POOL_TIMEOUT_S = 180.0
START_TIMEOUT_S = 300.0  # a task starts (and prints) once its VM has booted, under TCG
# The terminal's size at start (odd, so the container cannot print it by chance), then after a resize.
TERMINAL_SIZE = DEFAULT_SIZE
RESIZED = (41, 123)


@pytest.fixture(scope="module")
def prefix():
    """kata-runtime installed as an operator would, into a temporary prefix (and sysconfdir)."""
    with installed_prefix() as usr:
        yield usr


@pytest.fixture
def ctrd(run_root, prefix):
    config = kata_config(run_root, prefix)
    daemon = Containerd(os.path.join(run_root, "ctrd"),
                        render_config(os.path.join(run_root, "containerd.toml"), prefix),
                        env={"KATA_CONF_FILE": config},
                        runtime=runtime_binary(os.path.join(prefix, "bin", "kata-runtime")))
    try:
        daemon.start()
        daemon.import_image()
        yield daemon
    finally:
        leaks = daemon.stop()
        assert not leaks, "containerd left: " + "; ".join(leaks) + "\n" + daemon.log()


def assert_nothing_left(ctrd: Containerd, run_root: str) -> None:
    """No container, task, shim or runtime state in containerd; no VM, process or mount of the test."""
    left = ctrd.leftovers()
    left += [f"process {pid}" for pid in pids_mentioning(run_root) if pid != ctrd.proc.pid]
    left += [f"mount {m}" for m in mounts_under(run_root)]
    vms = os.path.join(run_root, "vm")
    left += [f"VM run directory {vms}/{name}" for name in (os.listdir(vms) if os.path.isdir(vms) else [])]
    assert not left, "left behind: " + "; ".join(left)


def guest_kernel_release(prefix: str) -> str:
    # The pin the installed runtime carries names the Debian package linux-image-<release>.
    pin = json.loads(Path(prefix, "lib", "kata-vmfactory", "tools", "guest_kernel.pin.json").read_text())
    return pin["package"].removeprefix("linux-image-")


def wait_stopped(ctrd: Containerd, container_id: str) -> None:
    wait_for(f"task {container_id} to stop", lambda: ctrd.task_status(container_id) == "STOPPED", TASK_TIMEOUT_S)


def delete(ctrd: Containerd, container_id: str) -> None:
    ctrd.ctr("task", "delete", container_id, check=True)
    ctrd.ctr("container", "delete", container_id, check=True)


# ---- the configuration file ---------------------------------------------------------------------


def test_the_repos_config_gives_containerds_cri_a_kata_handler_running_the_installed_launcher(ctrd, prefix, run_root):
    dumped = subprocess.run(["/usr/bin/containerd", "--config", ctrd.config, "config", "dump"],
                            capture_output=True, text=True, check=True, timeout=60).stdout
    kata = dumped[dumped.index('[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]'):]
    assert 'runtime_type = "io.containerd.runc.v2"' in kata.split("[plugins", 2)[1]
    assert f'BinaryName = "{prefix}/bin/kata-runtime"' in kata
    plugins = ctrd.ctr("plugins", "list", check=True).stdout
    assert any(line.split()[1:2] == ["cri"] and line.split()[-1] == "ok" for line in plugins.splitlines()[1:]), plugins
    assert_nothing_left(ctrd, run_root)


# ---- ctr run --rm ------------------------------------------------------------------------------


def test_ctr_run_prints_the_guest_kernel_release_not_the_hosts(ctrd, prefix, run_root):
    done = ctrd.run("uname", "uname", "-r")
    assert done.returncode == 0, done.stderr + ctrd.log()
    release = done.stdout.strip()
    assert release != os.uname().release, "the container ran on the host's kernel"
    assert release == guest_kernel_release(prefix)
    assert_nothing_left(ctrd, run_root)


def test_the_exit_code_and_both_streams_arrive(ctrd, run_root):
    done = ctrd.run("exits", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert done.returncode == 7, done.stderr
    assert done.stdout == "out\n"
    assert "err\n" in done.stderr
    assert_nothing_left(ctrd, run_root)


# ---- ctr run -t: the terminal (needs --console-socket in kata-runtime) ---------------------------


def test_ctr_run_t_gives_an_interactive_shell_that_follows_the_terminals_size(ctrd, run_root):
    """THE TERMINAL TEST: needs kata-runtime's --console-socket, for create and exec (helper "tty")."""
    term = Terminal(ctrd.run_argv("tty", "sh", tty=True), ctrd.env)
    try:
        term.expect("# ")  # busybox sh's root prompt: the shell reads the terminal
        term.type("echo hi-$((1+2))\n")
        term.expect("hi-3")  # the typed line echoes as hi-$((1+2)); only the shell prints hi-3
        # ctr sets the size only after the task started (HandleConsoleResize follows Start), and the
        # shell may be asked before it lands: ask until it shows, as for the resize below.
        first = iter(range(1000, 2000))
        wait_for("the terminal's size inside the container",
                 lambda: "{} {}".format(*TERMINAL_SIZE) in term.answer("stty size", next(first)), TASK_TIMEOUT_S)
        # A resize reaches ctr as SIGWINCH (sent here: the pty is not ctr's controlling terminal),
        # and ctr passes it on to the task's terminal; it lands a moment later, so ask again.
        term.resize(RESIZED)
        term.proc.send_signal(signal.SIGWINCH)
        marks = iter(range(1, 1000))
        wait_for("the new size inside the container",
                 lambda: "{} {}".format(*RESIZED) in term.answer("stty size", next(marks)), TASK_TIMEOUT_S)
        # An exec with a terminal of its own, beside the shell.
        execed = Terminal(ctrd.exec_argv("tty", "tty-exec", "sh", "-c", "tty; echo exec-$((2+2)); exit 6", tty=True),
                          ctrd.env)
        try:
            execed.expect("exec-4")
            assert execed.wait_exit() == 6, execed.seen[-2000:]
        finally:
            execed.close()
        assert b"/dev/pts/" in execed.seen, execed.seen  # `tty` names a pty, not "not a tty"
        term.type("exit 5\n")
        assert term.wait_exit() == 5, term.seen[-2000:]
    finally:
        term.close()
    assert_nothing_left(ctrd, run_root)


# ---- ctr run -d and the task commands --------------------------------------------------------------


def test_a_detached_task_execs_lists_its_processes_takes_signals_and_is_deleted(ctrd, run_root):
    # SIGTERM is trapped (the process notes it and runs on), so SIGKILL is what ends it.
    script = "trap 'touch /tmp/got-term' TERM; while :; do sleep 1; done"
    started = ctrd.run("life", "sh", "-c", script, detach=True)
    assert started.returncode == 0, started.stderr + ctrd.log()
    assert ctrd.task_status("life") == "RUNNING"
    pid = ctrd.task_pid("life")

    execed = ctrd.exec("life", "e1", "sh", "-c", "echo in-exec; hostname; exit 3")
    assert execed.returncode == 3, execed.stderr
    assert execed.stdout.splitlines()[0] == "in-exec"

    listed = ctrd.ctr("task", "ps", "life", check=True).stdout.splitlines()
    assert listed[0].split() == ["PID", "INFO"]
    assert pid in [int(line.split()[0]) for line in listed[1:]], listed

    ctrd.ctr("task", "kill", "--signal", "SIGTERM", "life", check=True)
    checks = iter(range(1000))
    wait_for("the container to see SIGTERM",
             lambda: ctrd.exec("life", f"check{next(checks)}", "test", "-e", "/tmp/got-term").returncode == 0,
             TASK_TIMEOUT_S)
    assert ctrd.task_status("life") == "RUNNING"

    ctrd.ctr("task", "kill", "--all", "--signal", "SIGKILL", "life", check=True)
    wait_stopped(ctrd, "life")
    delete(ctrd, "life")
    assert_nothing_left(ctrd, run_root)


@pytest.mark.parametrize("signal_name, command, status", [
    ("SIGTERM", ["sh", "-c", "trap 'exit 42' TERM; while :; do sleep 1; done"], 42),
    ("SIGKILL", ["sleep", "1000"], 128 + signal.SIGKILL),
])
def test_ctr_run_exits_with_the_status_a_signal_gave_the_task(ctrd, run_root, signal_name, command, status):
    # An attached `ctr run` (its exit code is the task's) and the signal from `ctr task kill`.
    with subprocess.Popen(ctrd.run_argv("sig", *command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=ctrd.env) as run:
        try:
            wait_for("task sig to run", lambda: run.poll() is not None or ctrd.task_status("sig") == "RUNNING",
                     START_TIMEOUT_S)
            ctrd.ctr("task", "kill", "--signal", signal_name, "sig", check=True)
            _out, err = run.communicate(timeout=TASK_TIMEOUT_S)
        finally:
            if run.poll() is None:
                run.kill()
    assert run.returncode == status, err + ctrd.log()
    assert_nothing_left(ctrd, run_root)


# ---- VMCache -------------------------------------------------------------------------------------


def test_with_a_vmcache_server_the_containers_vm_comes_from_the_pool(ctrd, prefix, run_root):
    config = kata_config(run_root, prefix, cache=1)  # the file containerd's $KATA_CONF_FILE names
    runtime = os.path.join(prefix, "bin", "kata-runtime")
    env = {**os.environ, "KATA_CONF_FILE": config}

    def kata(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([runtime, *args], capture_output=True, text=True, timeout=120, env=env)

    def pool() -> dict:
        status = json.loads(kata("factory", "status", "--json").stdout)
        return status.get("vm_cache", {}).get("pool", {})

    with open(os.path.join(run_root, "server.log"), "w+") as log:
        server = subprocess.Popen([os.path.join(prefix, "bin", "kata-vmcache-server"), "--config", config],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            ready = wait_for("the pool's VM", lambda: server.poll() is None and pool().get("ready") == 1
                             and pool(), POOL_TIMEOUT_S)
            pooled = {slot["vm_id"] for slot in ready["slots"] if slot["vm_id"]}

            started = ctrd.run("pooled", "sleep", "1000", detach=True)
            assert started.returncode == 0, started.stderr + ctrd.log()
            # The state containerd's shim keeps through the runtime: --root <runc root>/<namespace>.
            state = kata("--root", os.path.join(ctrd.runc_root, "kvf"), "state", "pooled")
            assert state.returncode == 0, state.stderr
            annotations = json.loads(state.stdout)["annotations"]
            assert annotations["io.katacontainers.factory.path"] == "vmcache", annotations
            assert annotations["io.katacontainers.vm.id"] in pooled, (annotations, pooled)
            assert int(pool()["vms_handed_out"]) >= 1

            ctrd.ctr("task", "kill", "--signal", "SIGKILL", "pooled", check=True)
            wait_stopped(ctrd, "pooled")
            delete(ctrd, "pooled")
        finally:
            kata("factory", "destroy")  # quits the server, which stops its pool
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.seek(0)
            server_log = log.read()
    assert server.returncode is not None, server_log
    assert_nothing_left(ctrd, run_root)
