"""Processes with a terminal in the guest agent (CreateProcess.terminal, ResizeConsole), run on the host.

As in test_agent_processes.py: real fork and exec of the host's /bin/sh, uncontained (guest_root),
so the helper opens the pty in the host's /dev/ptmx. The guest's line discipline is the real one:
typed input is echoed, output gets \\r\\n, ^D ends input.
"""
import time

import pytest

from guest.agent import containment
from protocols.agent import agent_pb2
from tests.unit.test_agent_processes import Guest

# Bounds for waits on a real child; reached only when something is broken.
DEADLINE_S = 10.0


@pytest.fixture
def guest(tmp_path):
    g = Guest(str(tmp_path / "guest"))
    yield g
    g.close()


def _output_until(guest: Guest, exec_id: str, needle: bytes) -> bytes:
    deadline = time.monotonic() + DEADLINE_S
    while needle not in guest.output(exec_id):
        assert time.monotonic() < deadline, f"{needle!r} not in the output of {exec_id}: {guest.output(exec_id)!r}"
        guest.pump()
    return guest.output(exec_id)


def _create_terminal(guest: Guest, exec_id: str, args, rows: int = 0, cols: int = 0, **fields) -> None:
    created = guest.create(exec_id, args, terminal=True, **fields)
    assert created.error == "", created.error
    if rows or cols:
        resized = guest.response(guest.send(resize_console=agent_pb2.ResizeConsoleRequest(
            exec_id=exec_id, rows=rows, cols=cols)))
        assert resized.error == "" and resized.WhichOneof("kind") == "resize_console", resized
    started = guest.response(guest.send(start_process=agent_pb2.StartProcessRequest(exec_id=exec_id)))
    assert started.error == "", started.error


def _write(guest: Guest, exec_id: str, data: bytes) -> None:
    written = guest.response(guest.send(write_stdin=agent_pb2.WriteStdinRequest(exec_id=exec_id, data=data)))
    assert written.error == "", written.error


def test_the_process_has_a_pty_as_its_controlling_terminal_with_the_size_set_before_start(guest):
    script = "tty; stty size; exec </dev/tty && echo controlling; echo to-stderr >&2"
    _create_terminal(guest, "t1", ["sh", "-c", script], rows=33, cols=101)
    assert guest.exited("t1") == 0
    lines = guest.output("t1").split(b"\r\n")  # the pty's output processing: \n becomes \r\n
    assert lines[0].startswith(b"/dev/pts/")
    assert lines[1:] == [b"33 101", b"controlling", b"to-stderr", b""]
    assert guest.output("t1", stream=2) == b""  # a terminal has one output stream


def test_typed_input_is_echoed_and_the_exit_status_arrives(guest):
    _create_terminal(guest, "sh", ["sh"], env=["PATH=/usr/bin:/bin", "PS1=prompt> "])
    _output_until(guest, "sh", b"prompt> ")
    _write(guest, "sh", b"echo hi; exit 3\n")
    assert guest.exited("sh") == 3
    out = guest.output("sh")
    assert b"echo hi; exit 3\r\n" in out  # the terminal's echo of the typed line
    assert out.endswith(b"hi\r\n")


def test_a_resize_after_start_reaches_the_process(guest):
    _create_terminal(guest, "r1", ["sh", "-c", "stty size; read line; stty size"], rows=24, cols=80)
    _output_until(guest, "r1", b"24 80\r\n")
    resized = guest.response(guest.send(resize_console=agent_pb2.ResizeConsoleRequest(exec_id="r1", rows=50,
                                                                                      cols=132)))
    assert resized.error == ""
    _write(guest, "r1", b"\n")
    assert guest.exited("r1") == 0
    assert guest.output("r1").endswith(b"\r\n50 132\r\n")


def test_close_stdin_ends_input_even_after_a_partial_line(guest):
    _create_terminal(guest, "cat", ["cat"])
    _write(guest, "cat", b"partial")  # no newline: the first ^D hands the line over, the second ends it
    closed = guest.response(guest.send(close_stdin=agent_pb2.CloseStdinRequest(exec_id="cat")))
    assert closed.error == ""
    assert guest.exited("cat") == 0
    assert guest.output("cat").count(b"partial") == 2  # echoed, then written by cat
    refused = guest.response(guest.send(write_stdin=agent_pb2.WriteStdinRequest(exec_id="cat", data=b"x")))
    assert "not running" in refused.error


def test_resize_errors_name_the_process(guest):
    assert guest.run("plain", ["true"]) == 0
    for exec_id, message in (("plain", "process 'plain' has no terminal"), ("ghost", "no process with exec_id")):
        refused = guest.response(guest.send(resize_console=agent_pb2.ResizeConsoleRequest(exec_id=exec_id, rows=1,
                                                                                          cols=1)))
        assert message in refused.error
    _create_terminal(guest, "t1", ["true"])
    assert guest.exited("t1") == 0
    after = guest.response(guest.send(resize_console=agent_pb2.ResizeConsoleRequest(exec_id="t1", rows=1, cols=1)))
    assert "not running (exited with status 0)" in after.error


def test_oversized_window_is_refused(guest):
    _create_terminal(guest, "t1", ["sh", "-c", "read line"])
    refused = guest.response(guest.send(resize_console=agent_pb2.ResizeConsoleRequest(exec_id="t1", rows=70000,
                                                                                      cols=80)))
    assert "terminal size 70000x80 is over 65535" in refused.error
    _write(guest, "t1", b"\n")
    assert guest.exited("t1") == 0


def test_the_agent_keeps_no_terminal_after_the_exit(guest):
    _create_terminal(guest, "t1", ["true"])
    assert guest.exited("t1") == 0
    proc = guest.handler.processes._procs["t1"]
    assert proc.fds() == []


def test_the_helper_is_told_to_open_a_terminal():
    request = agent_pb2.CreateProcessRequest(exec_id="t", args=["sh"], rootfs="/r", terminal=True)
    assert "--terminal" in containment.helper_args("/sbin/vmf-contain", request, "/bin/sh")
    assert "--terminal" not in containment.helper_args("/sbin/vmf-contain", agent_pb2.CreateProcessRequest(
        exec_id="t", args=["sh"], rootfs="/r"), "/bin/sh")


def test_a_terminal_process_leaves_no_fd_of_the_agent_open_in_the_child(guest):
    # The helper closes everything above its own fds: only 0-2 (the pty) reach the program.
    _create_terminal(guest, "t1", ["sh", "-c", "ls /proc/self/fd"])
    assert guest.exited("t1") == 0
    fds = sorted(int(n) for n in guest.output("t1").split() if n.isdigit())
    assert fds[:3] == [0, 1, 2] and len(fds) == 4  # the fourth: ls's own directory fd
