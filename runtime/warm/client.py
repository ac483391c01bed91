"""The thin kata-runtime: hands a command to the warm server and exits with its exit status.

Imports only what a cold interpreter has at hand (os and C modules; wire.py says why not socket
or json): this is all the Python a warm command pays for. Anything unexpected before the server
has taken the command (no server, one of another build, fds it cannot pass) leaves the command
to the cold path, which then starts a server for the next command.
"""
from __future__ import annotations

import _signal
import _socket
import os
import sys

from runtime.warm import address, anchor, namespaces, wire

# "0": every command runs cold and no server is started (for debugging the cold path).
SWITCH_ENV = "KATA_RUNTIME_WARM"
# How start_server passes the state root and this program's sys.path to the server.
ROOT_ENV = "KATA_RUNTIME_WARM_ROOT"
PATH_ENV = "KATA_RUNTIME_WARM_PATH"
# Signals the caller may send a runtime command (an engine's timeout, Ctrl-C): they go to the
# worker running it, which reacts as the cold command would.
FORWARDED_SIGNALS = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)


class Outcome:
    """What forward() found: whether the cold path should start a server (for the root's next
    commands: launch.py starts it at once if the root exists, else after the command made it)."""
    server_wanted = False
    root = ""


OUTCOME = Outcome()


def enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "1") != "0"


def forward(argv: list[str]) -> int | None:
    """The command's exit status once the warm server ran it; None: run it cold."""
    if not enabled():
        return None
    parsed = address.parse(argv)
    if parsed is None:
        return None
    command, OUTCOME.root = parsed
    program = address.program_dir()
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        _connect(sock, address.socket_path(OUTCOME.root, program))
    except OSError:
        OUTCOME.server_wanted = True  # any command on the root starts one (`factory status` too)
        sock.close()
        return None
    if command not in address.WARM_COMMANDS:
        sock.close()  # a server is up; this command runs cold
        return None
    if wire.peer_uid(sock) not in (0, os.geteuid()):
        sock.close()  # not a server of ours: never hand it our stdio
        return None
    try:
        cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            mask = os.umask(0)
            os.umask(mask)
            wire.send(sock, {"program": program, "root": OUTCOME.root, "argv": list(argv), "env": dict(os.environ),
                             "umask": mask,
                             "namespaces": namespaces.identity()}, [0, 1, 2, cwd])
        finally:
            os.close(cwd)
    except OSError:
        sock.close()  # a closed stdio fd, a deleted working directory: the cold path says what
        return None
    return _follow(sock)


def _connect(sock: _socket.socket, path: str) -> None:
    if len(os.fsencode(path)) <= 107:
        sock.connect(path)
        return
    from hostos import sockets  # an engine's long state root

    sockets.connect(sock, path)


def _follow(sock: _socket.socket) -> int | None:
    worker = 0
    while True:
        try:
            message, fds = wire.receive(sock)
        except (wire.WireError, OSError):
            if not worker:
                return None  # the server went away before anything ran
            print("kata-runtime: the warm runtime's worker ended without an exit status "
                  "(KATA_RUNTIME_WARM=0 runs commands cold)", file=sys.stderr)
            return 1
        if "refused" in message:
            OUTCOME.server_wanted = True  # it is exiting (stale code); the next one is this build's
            return None
        if "worker" in message:
            worker = int(message["worker"])
            for sig in FORWARDED_SIGNALS:
                _signal.signal(sig, lambda number, _frame, pid=worker: _pass_on(pid, number))
        elif "anchor" in message and fds:
            pid = anchor.start(fds[0], sock)
            wire.send(sock, {"anchor_pid": pid})
        elif "exit" in message:
            return int(message["exit"])


def _pass_on(pid: int, number: int) -> None:
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        pass


def start_server(root: str) -> None:
    """Starts the warm server of `root` for this program, detached (its own session, stdio on
    /dev/null), as a fresh interpreter: the cold command's parsed flags and handlers are not its.
    The root and the module path go in its environment, not its command line: whoever cleans up
    a root (or an install) by killing the processes that name it must not take the server for a
    leak (it exits with the root, and with its program's directory)."""
    import json

    boot = (f"import json, os, sys; sys.path[:0] = json.loads(os.environ.pop({PATH_ENV!r})); "
            f"from runtime.warm import server; server.main(os.environ.pop({ROOT_ENV!r}))")
    argv = [sys.executable, "-I", "-c", boot]
    # Its own environment only: the cold command goes on, and its shim, hooks and QEMU inherit ours.
    env = {**os.environ, ROOT_ENV: root, PATH_ENV: json.dumps(sys.path)}
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.execve(sys.executable, argv, env)
    finally:
        os._exit(1)
