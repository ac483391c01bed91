"""The warm runtime without a VM: which command lines run warm, the message framing, and a real
warm server answering `list` and `state` exactly as the cold command line does, refusing what
it must not run, and leaving with its state root."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from absl import flags

from runtime import main  # noqa: F401  (defines the flags address.VALUE_FLAGS mirrors)
from runtime.warm import address, wire

# A server starts in well under this even on a loaded 2-core machine.
SERVER_START_S = 60.0


@pytest.mark.parametrize("argv, expected", [
    (["kata-runtime", "list"], ("list", address.DEFAULT_ROOT)),
    (["kata-runtime", "--root", "/r", "--log", "/l", "--log-format", "json", "create", "--bundle", "/b", "c1"],
     ("create", "/r")),
    (["kata-runtime", "--root=/r", "--debug", "run", "c1", "--bundle", "/b"], ("run", "/r")),
    (["kata-runtime", "delete", "--force", "c1", "--root", "/late"], ("delete", "/late")),
    (["kata-runtime", "ps", "c1", "-ef"], ("ps", address.DEFAULT_ROOT)),
])
def test_commands_that_run_warm(argv, expected):
    assert address.parse(argv) == expected


@pytest.mark.parametrize("argv", [
    ["kata-runtime"],
    ["kata-runtime", "--help"],
    ["kata-runtime", "--version"],
    ["kata-runtime", "-v"],
    ["kata-runtime", "list", "--root"],  # a flag missing its value: the cold path says so
    ["kata-runtime", "--", "list"],
])
def test_command_lines_left_to_the_cold_path(argv):
    assert address.parse(argv) is None


@pytest.mark.parametrize("argv", [
    ["kata-runtime", "exec", "c1", "sh"],  # a detached exec's holder must be the caller's child
    ["kata-runtime", "factory", "init"],  # runs for as long as the VMCache server
])
def test_commands_that_run_cold_but_start_a_server(argv):
    command, root = address.parse(argv)
    assert command not in address.WARM_COMMANDS and root == address.DEFAULT_ROOT


def test_value_flags_are_the_runtimes():
    """The thin client skips a flag's value by this list; a flag added to runtime/main.py with a
    value and missing here would make it misread the command."""
    taking_values = set()
    for flag in flags.FLAGS.get_flags_for_module("runtime.main"):
        if not flag.boolean:
            taking_values.add(flag.name)
            if flag.short_name:
                taking_values.add(flag.short_name)
    assert taking_values == set(address.VALUE_FLAGS)


def test_relative_root_is_the_callers(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BUILD_WORKING_DIRECTORY", raising=False)
    assert address.parse(["kata-runtime", "--root", "state", "list"]) == ("list", str(tmp_path / "state"))


def test_messages_carry_file_descriptors():
    ours, theirs = socket.socketpair()
    read_end, write_end = os.pipe()
    try:
        wire.send(ours, {"argv": ["a", "b"], "n": 3}, [write_end])
        message, fds = wire.receive(theirs)
        assert message == {"argv": ["a", "b"], "n": 3} and len(fds) == 1
        os.write(fds[0], b"through")
        os.close(fds[0])
        assert os.read(read_end, 16) == b"through"
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        ours.close()
        theirs.close()


@pytest.mark.parametrize("raw", [
    b"\xff\xff\xff\xff",  # longer than any message may be
    b"\x00\x00\x00\x02xx",  # not a marshalled dict
    b"\x00\x00\x00\x09abc",  # cut short
    b"",
])
def test_what_is_not_a_message(raw):
    ours, theirs = socket.socketpair()
    try:
        ours.sendall(raw)
        ours.shutdown(socket.SHUT_WR)
        with pytest.raises(wire.WireError):
            wire.receive(theirs)
    finally:
        ours.close()
        theirs.close()


def _runtime(root: str, *args: str, warm: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), KATA_RUNTIME_WARM="1" if warm else "0")
    return subprocess.run([sys.executable, "-c", "from runtime.launch import launch; launch()", "--root", root, *args],
                          env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def _server_pid(root: str) -> int | None:
    """The warm server of `root` (its lock file's holder), if one runs."""
    path = address.socket_path(root, address.program_dir())
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fds = os.listdir(f"/proc/{entry}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{entry}/fd/{fd}") == path + ".lock":
                        return int(entry)
                except OSError:
                    continue
    return None


def _wait_for(predicate, timeout_s: float = SERVER_START_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s: {predicate}")


@pytest.fixture
def root(tmp_path):
    path = str(tmp_path / "state")
    os.makedirs(path)
    yield path
    pid = _server_pid(path)
    if pid:
        os.kill(pid, 15)
        _wait_for(lambda: _server_pid(path) is None)
    assert not os.path.exists(address.socket_path(path, address.program_dir()))


def test_a_warm_server_answers_as_the_cold_command_line(root):
    cold = _runtime(root, "list", "--format", "json", warm=False)
    assert _server_pid(root) is None  # KATA_RUNTIME_WARM=0: no server either
    first = _runtime(root, "list", "--format", "json")  # cold, starts the server
    server = _wait_for(lambda: _server_pid(root))
    _wait_for(lambda: os.path.exists(address.socket_path(root, address.program_dir())))
    warm = _runtime(root, "list", "--format", "json")
    assert cold.returncode == first.returncode == warm.returncode == 0
    assert json.loads(cold.stdout) == json.loads(warm.stdout) == []
    missing = _runtime(root, "state", "nope"), _runtime(root, "state", "nope", warm=False)
    assert [m.returncode for m in missing] == [1, 1] and missing[0].stderr == missing[1].stderr
    assert "does not exist" in missing[0].stderr
    assert _server_pid(root) == server  # the same server answered


def test_a_cold_command_starts_the_server_for_the_next(root):
    _runtime(root, "factory", "status")  # not run warm, but a user's first look at the factory
    _wait_for(lambda: _server_pid(root))


def test_the_server_leaves_with_its_root(root):
    _runtime(root, "list")
    server = _wait_for(lambda: _server_pid(root))
    os.rmdir(root)
    _wait_for(lambda: not os.path.exists(f"/proc/{server}") or _server_pid(root) is None, timeout_s=30)
    assert not os.path.exists(address.socket_path(root, address.program_dir()))
    os.makedirs(root)


def test_a_request_for_another_root_is_refused(root):
    _runtime(root, "list")
    _wait_for(lambda: _server_pid(root))
    path = _wait_for(lambda: (p := address.socket_path(root, address.program_dir())) and os.path.exists(p) and p)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    cwd = os.open(".", os.O_PATH)
    try:
        wire.send(sock, {"program": address.program_dir(), "root": "/elsewhere", "argv": ["kata-runtime", "list"],
                         "env": {}, "umask": 0o22, "namespaces": {}}, [0, 1, 2, cwd])
        reply, _ = wire.receive(sock)
        assert "refused" in reply
    finally:
        os.close(cwd)
        sock.close()


def test_a_new_server_sweeps_what_killed_ones_left(root):
    stale = os.path.join(address.WARM_DIR, "00000000-00000000.sock")
    os.makedirs(address.WARM_DIR, mode=0o700, exist_ok=True)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(stale)  # a server's socket, its server SIGKILLed
    dead.close()
    open(stale + ".lock", "w").close()
    _runtime(root, "list")
    _wait_for(lambda: _server_pid(root))
    _wait_for(lambda: not os.path.exists(stale) and not os.path.exists(stale + ".lock"))
