"""The warm server of one state root and program: imports everything once, then forks a worker
per command (runtime/warm/__init__.py says why and how).

It runs as the caller's user, accepts only that user's connections and commands from its own
namespaces, exits when idle, when its state root is removed, when its socket is removed or
replaced, and when its code changed on disk (it would run stale code: it refuses the
command, which then runs cold and starts a server of the new code).
"""
from __future__ import annotations

import importlib
import os
import selectors
import signal
import socket
import sys
import time

from runtime.warm import address, anchor, namespaces, wire

# Idle this long with no command running, it exits: a new one costs one cold command.
IDLE_EXIT_S = 600.0
# How often it looks whether its socket is still its own and whether it is idle.
TICK_S = 1.0
# A worker gets its request right after the connect; one that does not in this long is dropped.
REQUEST_TIMEOUT_S = 10.0
LISTEN_BACKLOG = 64
PR_SET_CHILD_SUBREAPER = 36  # prctl(2)
# What a command imports on its way (the CLI, the shim and the factory paths it may take).
WARM_MODULES = (
    "runtime.main", "runtime.sandbox.commands", "runtime.sandbox.shim", "runtime.sandbox.vm_source",
    "runtime.runtime_log", "configuration.loader", "factory.factory", "factory.grpccache",
    "factory.template", "factory.direct", "factory.cache", "factory.reaper", "logging.handlers",
    "asyncio", "grpc", "grpc.aio",
)


def main(root: str) -> None:
    os.chdir("/")  # the first command's directory may be a mount point someone will unmount
    program = address.program_dir()
    path = address.socket_path(root, program)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    directory = os.stat(os.path.dirname(path))
    if directory.st_uid != os.geteuid() or directory.st_mode & 0o077:
        return  # not a directory only we can write: no server (commands run cold)
    try:
        root_inode = os.stat(root).st_ino
    except OSError:
        return  # nothing to serve yet; a command that makes the root starts the next server
    from hostos import locks

    lock_path = path + ".lock"
    lock_fd = locks.try_acquire(lock_path)
    if lock_fd is None:
        return  # another server of this root and program is starting or running
    try:
        _sweep(os.path.dirname(path), lock_path)
        for name in WARM_MODULES:
            importlib.import_module(name)
        _become_subreaper()
        Server(path, program, root, root_inode).serve()
    finally:
        locks.remove(lock_path)  # holding it: a server starting now takes a new file
        os.close(lock_fd)


def _sweep(directory: str, own_lock: str) -> None:
    """Removes the socket and lock of servers that died without doing it (SIGKILL): a lock
    nobody holds has no server behind it (a server takes its lock before anything else)."""
    from hostos import locks

    for name in os.listdir(directory):
        lock_path = os.path.join(directory, name)
        if not name.endswith(".sock.lock") or lock_path == own_lock:
            continue
        fd = locks.try_acquire(lock_path)
        if fd is None:
            continue  # a live server's
        try:
            try:
                os.unlink(lock_path[:-len(".lock")])
            except FileNotFoundError:
                pass
            locks.remove(lock_path)
        finally:
            os.close(fd)


def _become_subreaper() -> None:
    """A shim outlives the worker that forked it; its parent is then this server, which reaps it,
    not whichever subreaper adopted the server (a container engine's shim of another container)."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def code_signature(program: str) -> tuple:
    """The files of the modules loaded from this program, as they are on disk now."""
    files = []
    for module in list(sys.modules.values()):
        source = getattr(module, "__file__", None)
        if source and source.startswith(program):
            try:
                stat = os.stat(source)
            except OSError:
                files.append((source, 0, 0))
                continue
            files.append((source, stat.st_mtime_ns, stat.st_size))
    return tuple(sorted(files))


class Server:
    def __init__(self, path: str, program: str, root: str, root_inode: int) -> None:
        self.path = path
        self.program = program
        self.root = root
        self.root_inode = root_inode
        self.signature = code_signature(program)
        self.workers: dict[int, socket.socket] = {}  # worker pid -> its client's connection
        self.last_active = time.monotonic()
        self.stopping = False

    def serve(self) -> None:
        try:
            os.unlink(self.path)  # a dead server's (we hold the lock)
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _bind(listener, self.path)
        os.chmod(self.path, 0o600)
        listener.listen(LISTEN_BACKLOG)
        inode = os.stat(self.path).st_ino
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        selector.register(wake_read, selectors.EVENT_READ)
        try:
            while not self.stopping:
                for key, _ in selector.select(TICK_S):
                    if key.fileobj is listener:
                        self._accept(listener, wake_read, wake_write)
                    else:
                        _drain(wake_read)
                self._reap()
                if self._should_exit(inode):
                    break
        finally:
            if self._own_socket(inode):
                os.unlink(self.path)

    def _accept(self, listener: socket.socket, *inherited: int) -> None:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self.last_active = time.monotonic()
        if wire.peer_uid(conn) != os.geteuid():
            conn.close()  # another user's command: never run as ours
            return
        if code_signature(self.program) != self.signature:
            _refuse(conn, "its code changed on disk")
            self.stopping = True
            return
        pid = os.fork()
        if pid == 0:
            keep = conn.fileno()
            for fd in (listener.fileno(), *inherited, *(c.fileno() for c in self.workers.values())):
                if fd != keep:
                    os.close(fd)
            _work(conn, self.program, self.root)  # never returns
        self.workers[pid] = conn

    def _reap(self) -> None:
        """Workers, and shims whose worker has exited (this is their subreaper)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.workers.pop(pid, None)
            if conn is None:
                continue
            if os.WIFSIGNALED(status):  # it could not say its status itself
                try:
                    wire.send(conn, {"exit": 128 + os.WTERMSIG(status)})
                except OSError:
                    pass
            conn.close()
            self.last_active = time.monotonic()

    def _should_exit(self, inode: int) -> bool:
        if not self._own_socket(inode):
            return True  # removed, or another server took the name
        try:
            if os.stat(self.root).st_ino != self.root_inode or not os.path.isdir(self.program):
                return True
        except OSError:
            return True  # the state root is gone (a test's, an engine's that was cleaned up), or
            # the program is (uninstalled)
        return not self.workers and time.monotonic() - self.last_active > IDLE_EXIT_S

    def _own_socket(self, inode: int) -> bool:
        try:
            return os.stat(self.path).st_ino == inode
        except OSError:
            return False


def _bind(sock: socket.socket, path: str) -> None:
    from hostos import sockets

    sockets.bind(sock, path)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _refuse(conn: socket.socket, why: str) -> None:
    try:
        wire.send(conn, {"refused": why})
    except OSError:
        pass
    conn.close()


def _work(conn: socket.socket, program: str, root: str) -> None:
    """A worker: takes the client's stdio, directory and environment, runs the command as the
    cold command line would, reports its exit status. Never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        conn.settimeout(REQUEST_TIMEOUT_S)
        request, fds = wire.receive(conn)
        conn.settimeout(None)
        if len(fds) != 4 or request.get("program") != program or request.get("root") != root:
            _refuse(conn, "a request from another program or for another state root")
            os._exit(1)
        if request.get("namespaces") != namespaces.identity():
            _refuse(conn, "a client in other namespaces")
            os._exit(1)
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)  # inheritable, as the cold command's stdio
        os.fchdir(fds[3])
        for fd in fds:
            os.close(fd)
        os.umask(int(request.get("umask", 0o022)))
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in request["env"].items()})
        sys.argv = [str(arg) for arg in request["argv"]]
        sys.stdout.reconfigure(line_buffering=os.isatty(1))
        wire.send(conn, {"worker": os.getpid()})
        from runtime import main as cli

        cli.SHIM_ANCHOR = lambda: _anchor(conn)
        code = _run(cli)
    except BaseException as err:  # noqa: BLE001 - the client must still get a status
        try:
            print(f"kata-runtime: the warm runtime failed: {err!r} (KATA_RUNTIME_WARM=0 runs commands cold)",
                  file=sys.stderr)
        except OSError:
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        try:
            wire.send(conn, {"exit": code})
        except OSError:
            pass
        os._exit(code)


def _run(cli) -> int:
    try:
        cli.run()
    except SystemExit as done:
        if done.code is None:
            return 0
        if isinstance(done.code, int):
            return done.code
        print(done.code, file=sys.stderr)
        return 1
    return 0


def _anchor(conn: socket.socket) -> anchor.Anchor:
    """Has the client fork the shim's anchor; returns the shim's side of it."""
    from hostos import process as host_process

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        wire.send(conn, {"anchor": True}, [theirs.fileno()])
    finally:
        theirs.close()
    reply, fds = wire.receive(conn)
    for fd in fds:
        os.close(fd)
    pid = int(reply["anchor_pid"])
    return anchor.Anchor(pid, host_process.start_time(pid) or 0, ours)

