"""The host side of an exec: the process that holds it, in the foreground or detached.

An exec's process runs in the guest; on the host it is represented by the process holding its
control connection to the shim (the "holder"). That is the pid a container engine knows the exec
by: containerd's runc shim runs `exec --detach --pid-file F`, reads the pid from F, signals it to
signal the exec, and reaps it (as subreaper) to learn the exit status. So the holder forwards the
signals a process can catch to the guest process, exits with the process's exit status, and,
killed by SIGKILL, closes the connection, on which the shim kills the process.

The caller's stdin, stdout and stderr go to the shim with the request: the process's output is
written there by the shim, not relayed through the holder.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from hostos import files
from hostos import process as host_process
from runtime.sandbox import control
from runtime.sandbox.state import ContainerError

# What the holder passes on; SIGKILL and SIGSTOP cannot be caught (SIGKILL ends the exec through
# the closed connection).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT)
# The holder's exit status when the exec ended without one (its container or shim went away).
LOST_STATUS = 1


class _Holder:
    """One exec's connection: started, then waited for with signals forwarded."""

    def __init__(self, socket_path: str, request: dict[str, Any]) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.conn = control.request(socket_path, request, fds=[0, 1, 2], timeout_s=None)

    def started(self) -> None:
        self.conn.read_reply()  # {"ok": true} once the process runs; an error is raised

    def wait(self) -> int:
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, self._forward)
        try:
            return int(self.conn.read_reply()["exit_status"])
        finally:
            for signum in FORWARDED_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)

    def _forward(self, signum: int, _frame: object) -> None:
        try:
            self.conn.sock.sendall(control.encode({"op": "signal", "signal": signum}))
        except OSError:
            pass  # the shim is gone: the wait that follows says so

    def close(self) -> None:
        self.conn.sock.close()


def run_foreground(socket_path: str, request: dict[str, Any], pid_file: str | None) -> int:
    """Runs the exec with this process as its holder; returns the exec's exit status."""
    holder = _Holder(socket_path, request)
    try:
        holder.started()
        if pid_file:
            _write_pid(pid_file, os.getpid())
        return holder.wait()
    finally:
        holder.close()


def run_detached(socket_path: str, request: dict[str, Any], pid_file: str | None) -> int:
    """Starts a holder in a new session and returns once the exec runs and the holder's pid is
    in `pid_file`; the holder exits with the exec's exit status, reaped by whoever adopts it."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder
        os.close(read_fd)
        os._exit(_hold(socket_path, request, write_fd))
    os.close(write_fd)
    with os.fdopen(read_fd) as reports:
        line = reports.readline()
    report = json.loads(line) if line else {"error": "the exec's holder process exited before it started"}
    if "error" in report:
        os.waitpid(pid, 0)
        raise ContainerError(str(report["error"]))
    if pid_file:
        try:
            _write_pid(pid_file, pid)
        except ContainerError:
            os.kill(pid, signal.SIGKILL)  # nobody could find it to wait for it
            raise
    return 0


def _hold(socket_path: str, request: dict[str, Any], report_fd: int) -> int:
    """The detached holder's life; never returns into the caller's code (the caller _exits)."""
    def report(message: dict[str, Any]) -> None:
        os.write(report_fd, (json.dumps(message) + "\n").encode())
        os.close(report_fd)

    try:
        os.setsid()
        holder = _Holder(socket_path, request)
        if request.get("console_socket"):
            # The exec's terminal is the engine's pty; go-runc waits for the end of the pipe it
            # gave a terminal exec as stdio, so the holder must not keep that pipe open.
            host_process.stdio_to_devnull()
        holder.started()
    except BaseException as err:  # everything goes back to the exec command, which prints it
        report({"error": str(err) or type(err).__name__})
        return LOST_STATUS
    report({"ok": True})
    try:
        return holder.wait()
    except ContainerError as err:
        print(f"kata-runtime: {err}", file=sys.stderr, flush=True)
        return LOST_STATUS
    except BaseException:
        return LOST_STATUS


def _write_pid(pid_file: str, pid: int) -> None:
    try:
        files.write_atomic(pid_file, f"{pid}".encode())
    except OSError as err:
        raise ContainerError(f"cannot write --pid-file {pid_file}: {err}") from err
