"""Docker drives the installed kata-runtime (`docker run --runtime kata`) through containerd's runc shim.

Each test starts a private containerd with deploy/containerd/config.toml and a private dockerd
on it (tests/integration/docker.py: Debian's dockerd 20.10 from the bootstrap's cache, its own
roots and socket, its own network namespace) with `--add-runtime kata=<prefix>/bin/kata-runtime`,
the runtime //:install put in a temporary prefix. `docker load` takes the locally built busybox
image. The runtime's configuration reaches it as $KATA_CONF_FILE through containerd's environment
(which containerd-shim-runc-v2 passes on). Each test ends with nothing left: no container in
dockerd or containerd, no shim, runtime state, mount or VM.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from hostos.process import pids_mentioning
from tests.integration import docker
from tests.integration.containerd import (
    IMAGE_ARCHIVE,
    Containerd,
    installed_prefix,
    kata_config,
    missing,
    render_config,
)
from tests.integration.docker import Dockerd
from tests.integration.terminal import DEFAULT_SIZE, Terminal
from tests.integration.vmtest import mounts_under, wait_for

pytestmark = pytest.mark.skipif(bool(missing() or docker.missing()), reason=missing() or docker.missing())

# Bounded waits for what other processes do: a signal seen, a size passed on, a container's exit.
TASK_TIMEOUT_S = 60.0
# After the terminal's first size: odd, so the container cannot print it by chance.
RESIZED = (41, 123)


@pytest.fixture(scope="module")
def prefix():
    with installed_prefix() as usr:
        yield usr


@pytest.fixture
def engine(run_root, prefix):
    """containerd, and dockerd on it, with the busybox image loaded."""
    runtime = os.path.join(prefix, "bin", "kata-runtime")
    env = {"KATA_CONF_FILE": kata_config(run_root, prefix)}
    ctrd = Containerd(os.path.join(run_root, "ctrd"), render_config(os.path.join(run_root, "containerd.toml"), prefix),
                      env=env, runtime=runtime)
    daemon = Dockerd(os.path.join(run_root, "dk"), ctrd, runtime, env)
    leaks: list[str] = []
    try:
        ctrd.start()
        daemon.start()
        daemon.load_image(IMAGE_ARCHIVE)
        yield daemon
    finally:
        try:
            leaks += daemon.stop()
        finally:
            leaks += ctrd.stop()
        assert not leaks, "docker or containerd left: " + "; ".join(leaks) + "\n" + daemon.log()


def assert_nothing_left(daemon: Dockerd, run_root: str) -> None:
    """No container, shim, runtime state, VM, process or mount of the test but the two daemons' own."""
    ctrd = daemon.containerd
    left = daemon.leftovers() + ctrd.leftovers()
    daemons = {ctrd.proc.pid, daemon.proc.pid}
    left += [f"process {pid}" for pid in pids_mentioning(run_root) if pid not in daemons]
    dockerds_own = {os.path.join(daemon.exec_root, "netns", "default"), daemon.data_root}
    left += [f"mount {m}" for m in mounts_under(run_root) if m not in dockerds_own]
    vms = os.path.join(run_root, "vm")
    left += [f"VM run directory {vms}/{name}" for name in (os.listdir(vms) if os.path.isdir(vms) else [])]
    assert not left, "left behind: " + "; ".join(left)


def guest_kernel_release(prefix: str) -> str:
    # The pin the installed runtime carries names the Debian package linux-image-<release>.
    pin = json.loads(Path(prefix, "lib", "kata-vmfactory", "tools", "guest_kernel.pin.json").read_text())
    return pin["package"].removeprefix("linux-image-")


# ---- docker run --rm -------------------------------------------------------------------------------


def test_docker_run_prints_the_guest_kernel_release_not_the_hosts(engine, prefix, run_root):
    done = engine.run("--rm", "--network", "none", docker.IMAGE, "uname", "-r")
    assert done.returncode == 0, done.stderr + engine.log()
    release = done.stdout.strip()
    assert release != os.uname().release, "the container ran on the host's kernel"
    assert release == guest_kernel_release(prefix)
    assert_nothing_left(engine, run_root)


def test_the_exit_code_and_both_streams_arrive(engine, run_root):
    done = engine.run("--rm", "--network", "none", docker.IMAGE, "sh", "-c", "echo out; echo err >&2; exit 7")
    assert done.returncode == 7, done.stderr + engine.log()
    assert done.stdout == "out\n"
    assert "err\n" in done.stderr
    assert_nothing_left(engine, run_root)


# ---- docker run -it --------------------------------------------------------------------------------


def test_docker_run_it_gives_an_interactive_shell_that_follows_the_terminals_size(engine, run_root):
    term = Terminal(engine.run_argv("--interactive", "--tty", "--rm", "--network", "none", docker.IMAGE, "sh"),
                    engine.cli_env)
    try:
        term.expect("# ")  # busybox sh's root prompt: the shell reads the terminal
        term.type("echo hi-$((1+2))\n")
        term.expect("hi-3")  # the typed line echoes as hi-$((1+2)); only the shell prints hi-3
        assert "/dev/pts/" in term.answer("tty", 0)
        # The CLI sets the size after the container has started (dockerd 20.10 takes no size at
        # create), and sets it again on SIGWINCH (sent here: the pty is not its controlling
        # terminal); either lands a moment later, so ask until it has.
        marks = iter(range(1, 1000))
        wait_for("the terminal's size inside the container",
                 lambda: "{} {}".format(*DEFAULT_SIZE) in term.answer("stty size", next(marks)), TASK_TIMEOUT_S)
        term.resize(RESIZED)
        term.proc.send_signal(signal.SIGWINCH)
        wait_for("the new size inside the container",
                 lambda: "{} {}".format(*RESIZED) in term.answer("stty size", next(marks)), TASK_TIMEOUT_S)
        term.type("exit 5\n")
        assert term.wait_exit() == 5, term.seen[-2000:]
    finally:
        term.close()
    assert_nothing_left(engine, run_root)


# ---- a detached container on Docker's default network ------------------------------------------------


def test_on_the_default_network_execs_top_signals_and_kill_work_and_the_hook_configures_the_shims_namespace(
        engine, run_root):
    # SIGTERM is trapped (the process notes it and runs on), so SIGKILL is what ends it.
    cid = engine.run_detached(docker.IMAGE, "sh", "-c",
                              "trap 'touch /tmp/got-term' TERM; echo ready; while :; do sleep 1; done")
    wait_for("the container's trap", lambda: "ready" in engine.docker("logs", cid).stdout, TASK_TIMEOUT_S)
    pid = int(engine.inspect(cid, "{{.State.Pid}}"))  # the shim's: the host pid kata-runtime reports
    address = engine.inspect(cid, "{{.NetworkSettings.IPAddress}}")
    assert address, "dockerd gave the container no address on its bridge"
    # config.json's prestart hook is dockerd's libnetwork-setkey, which kata-runtime ran on the host:
    # it moved the container's veth into the network namespace of that pid (the shim's own, not
    # the host's). The guest has no network device: nothing carries it into the VM.
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    assert "eth0:" in Path(f"/proc/{pid}/net/dev").read_text()
    assert address in Path(f"/proc/{pid}/net/fib_trie").read_text()

    # The VM's loopback is up, as in any runc container's network namespace.
    loopback = engine.docker("exec", cid, "ip", "-o", "-4", "addr", "show", "dev", "lo", "up")
    assert "127.0.0.1/8" in loopback.stdout, loopback.stdout + loopback.stderr

    execed = engine.docker("exec", cid, "sh", "-c", "echo in-exec; hostname; exit 3")
    assert execed.returncode == 3, execed.stderr
    assert execed.stdout.splitlines() == ["in-exec", cid[:12]]

    term = Terminal([engine.cli, "exec", "--interactive", "--tty", cid, "sh", "-c", "tty; echo exec-$((2+2)); exit 6"],
                    engine.cli_env)
    try:
        term.expect("exec-4")
        assert term.wait_exit() == 6, term.seen[-2000:]
    finally:
        term.close()
    assert b"/dev/pts/" in term.seen, term.seen  # `tty` names a pty, not "not a tty"

    top = engine.docker("top", cid, check=True).stdout.splitlines()
    assert str(pid) in [line.split()[1] for line in top[1:]], top  # `ps` lists the container's host pid

    engine.docker("kill", "--signal", "TERM", cid, check=True)
    wait_for("the container to see SIGTERM",
             lambda: engine.docker("exec", cid, "test", "-e", "/tmp/got-term").returncode == 0, TASK_TIMEOUT_S)
    assert engine.inspect(cid, "{{.State.Status}}") == "running"

    engine.docker("kill", cid, check=True)
    assert engine.docker("wait", cid, check=True).stdout.strip() == str(128 + signal.SIGKILL)
    engine.docker("rm", cid, check=True)
    assert_nothing_left(engine, run_root)


def test_docker_stop_delivers_sigterm_and_the_logs_keep_what_the_container_printed(engine, run_root):
    cid = engine.run_detached("--network", "none", docker.IMAGE, "sh", "-c",
                              "trap 'echo bye; exit 0' TERM; echo started; while :; do sleep 1; done")
    wait_for("the container's first line", lambda: "started" in engine.docker("logs", cid).stdout, TASK_TIMEOUT_S)
    engine.docker("stop", cid, check=True)
    assert engine.inspect(cid, "{{.State.ExitCode}}") == "0"
    assert engine.docker("logs", cid, check=True).stdout.splitlines() == ["started", "bye"]
    engine.docker("rm", cid, check=True)
    assert_nothing_left(engine, run_root)
