"""Container processes: fork, set up, wait for StartProcess, exec; stdio pipes; exit statuses.

ProcessTable is driven by AgentHandler: requests arrive as method calls, and the service loop
hands it the readiness of the fds it asked to watch (poll_fds). Nothing here blocks for long:
every fd the agent keeps is non-blocking, CreateProcess and StartProcess wait at most
STATUS_WAIT_S for the helper, and answers that must wait longer (CreateProcess until the child is
set up, StartProcess until the exec, WaitProcess until the exit, WriteStdin until the pipe took
the data) come out later as messages from handle_ready() or reap().

Life of a process, as the agent sees it:
  CREATING  spawned: the helper vmf-contain (guest/contain/contain.c) puts it in its container
            (namespaces, mounts, pivot_root, ids, capabilities) and writes "R" on its status pipe,
            or "E<why>" and exits. A new container's helper also writes "C<pid>\n", the pid of
            the container's init, whose namespaces later execs join. CreateProcess is answered
            at "R".
  CREATED   the child blocks reading its start pipe.
  STARTING  StartProcess wrote the start byte and the child calls execve. The status pipe is
            close-on-exec, so EOF without an "E" means the exec happened; StartProcess is answered.
  RUNNING   its stdout and stderr pipes are read as they become readable.
  EXITED    reaped (a pidfd wakes the loop; SIGCHLD as a fallback). Its remaining output is sent,
            then ProcessExited, then the answers to WaitProcess. The record stays (bounded) so a
            late WaitProcess or SignalProcess still gets a proper answer.
A child that fails during CREATING was never created as far as the host knows: CreateProcess gets
the error and the child is reaped without an event.

A process with a terminal (CreateProcess.terminal) has no pipes: the helper gets /dev/null for
its own stdio and a console socket, the program opens a pty in its container's /dev/ptmx (so the
pty belongs to the container's devpts, as with runc) and sends the master on that socket before
it says "R". From then on the master is the process's stdin (WriteStdin) and its only output
(stream 1), and ResizeConsole sets its size. When the last slave closes, reading the master
gives EIO: that is the terminal's end of output.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import select
import signal
import socket
import struct
import termios
import time
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

from guest.agent import containment, mounts
from guest.agent.log import log
from guest.agent.messages import RequestError, reply_message, response_message
from protocols.agent import agent_pb2

CREATING, CREATED, STARTING, RUNNING, EXITED = "creating", "created", "starting", "running", "exited"

STDOUT, STDERR = 1, 2
# ProcessOutput chunks: one read of a pipe (a pipe holds 64 KiB by default), well under a frame.
OUTPUT_CHUNK_BYTES = 64 * 1024
# Exited processes remembered for late WaitProcess/SignalProcess; the oldest are forgotten first.
MAX_EXITED_KEPT = 256
# Without a pidfd (kernel < 5.3) and before SIGCHLD wakes the loop, how often to look for exits.
REAP_POLL_S = 0.1
# The terminal's master arrives as one SCM_RIGHTS message naming it ("/dev/ptmx", as runc sends).
CONSOLE_MESSAGE_BYTES = 64
# struct winsize holds unsigned shorts.
MAX_WINSIZE = 0xFFFF
# Linux signal numbers (SIGRTMAX is 64 on every architecture we run on).
MAX_SIGNAL = 64
# How long CreateProcess and StartProcess wait for the helper's verdict before leaving it to the
# service loop (see ProcessTable._await_status): a warm set-up takes 15-40 ms under TCG, and the
# loop (other processes' output) stalls for at most this.
STATUS_WAIT_S = 0.05
# The warm-up container (ProcessTable.warm_up): an empty rootfs on the guest's /run tmpfs (the
# helper makes its mount points), and as its program the helper itself (/proc/self/exe inside
# the container), which exits at once when told --warm-up.
WARM_UP_ID = "vmf-warm-up"
WARM_UP_ROOTFS = "/run/vmf-warm-up/rootfs"
WARM_UP_ARGS = ("/proc/self/exe", "--warm-up")

_READ = select.POLLIN
_WRITE = select.POLLOUT


class _StdinItem:
    __slots__ = ("request_id", "data", "close")

    def __init__(self, request_id: Optional[int], data: bytes = b"", close: bool = False) -> None:
        self.request_id = request_id
        self.data = memoryview(data)
        self.close = close


class _Process:
    def __init__(self, exec_id: str, pid: int) -> None:
        self.exec_id = exec_id
        self.pid = pid
        self.state = CREATING
        self.pidfd: Optional[int] = None
        self.status_fd: Optional[int] = None  # child -> agent: "R", "E<why>", EOF at exec
        self.status_data = b""
        self.start_fd: Optional[int] = None  # agent -> child: "S" to exec
        self.stdin_fd: Optional[int] = None  # None: /dev/null, or closed
        self.has_stdin = False
        self.stdin_closing = False
        self.stdin_queue: Deque[_StdinItem] = deque()
        self.stdin_at_line_start = True  # what CloseStdin must send to end a terminal's input
        self.outputs: Dict[int, int] = {}  # read end -> stream number
        self.terminal = False
        self.console_fd: Optional[int] = None  # the program sends its terminal's master here
        self.terminal_fd: Optional[int] = None  # that master, kept for ResizeConsole until the exit
        self.exit_status: Optional[int] = None
        self.init_pid = 0  # a new container's init (its namespaces), once the helper said it
        self.reaped = False
        self.create_request: Optional[int] = None
        self.start_request: Optional[int] = None
        self.start_early = False  # StartProcess came while CREATING
        self.waits: List[int] = []
        # trace_timing: (what, time.monotonic()) marks of CreateProcess, logged at "R".
        self.marks: List[Tuple[str, float]] = []
        self.warm_up_reply = ""  # a warm-up container's: the kind of reply owed at its end

    def fds(self) -> List[int]:
        fds = [self.pidfd, self.status_fd, self.start_fd, self.stdin_fd, *self.outputs, self.console_fd,
               self.terminal_fd]
        return [fd for fd in fds if fd is not None]


class CreatePlan:
    """What the helper is asked to do, all checked by the agent before spawning it."""

    def __init__(self, request: agent_pb2.CreateProcessRequest, contain_path: str,
                 join: Tuple[int, int] = (0, 0)) -> None:
        self.exec_id = request.exec_id
        self.args = list(request.args)
        self.rootfs = request.rootfs
        self.cwd = request.cwd or "/"
        self.open_stdin = request.open_stdin
        self.terminal = request.terminal
        self.env: Dict[str, str] = {}
        for entry in request.env:
            name, sep, value = entry.partition("=")
            if not sep or not name:
                raise RequestError(f"env entry {entry!r} is not NAME=value")
            self.env[name] = value  # the last of duplicates wins, as with execve's getenv
        if not self.exec_id:
            raise RequestError("exec_id is empty")
        if not self.args:
            raise RequestError(f"args of process {self.exec_id!r} are empty: args[0] names the program")
        if request.guest_root:
            self.rootfs = self.rootfs or "/"
            if self.rootfs != "/":
                raise RequestError(f"rootfs {self.rootfs!r} with guest_root: "
                                   "an uncontained process runs in the guest's /")
        elif os.path.normpath(self.rootfs or "/") == "/":
            raise RequestError(f"rootfs {self.rootfs!r} is the guest's root: a container needs its own rootfs")
        if not self.rootfs.startswith("/"):
            raise RequestError(f"rootfs {self.rootfs!r} is not an absolute guest path")
        if not self.cwd.startswith("/"):
            raise RequestError(f"cwd {self.cwd!r} is not an absolute path")
        # The rootfs and the program are looked up by the helper, inside the container: from
        # here each lookup would walk the 9p share from its root (~4 ms a step under TCG).
        self.argv = containment.helper_args(contain_path, request, self.env.get("PATH", containment.DEFAULT_PATH),
                                            join)


def exit_status_of(wait_status: int) -> int:
    """The shell's $? for a waitpid status: the exit code, or 128 + the signal that killed it."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status)
    return 255  # stopped/continued never reach here: waitpid is called without WUNTRACED


def _set_nonblocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)


def _close(fd: Optional[int]) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _event(kind: str) -> agent_pb2.GuestMessage:
    message = agent_pb2.GuestMessage()
    getattr(message.event, kind).SetInParent()
    return message


class ProcessTable:
    def __init__(self, mountinfo_path: str = "/proc/self/mountinfo", mount: mounts.MountFunction = mounts.mount_syscall,
                 contain_path: str = containment.DEFAULT_CONTAIN_PATH, warm_up_rootfs: str = WARM_UP_ROOTFS) -> None:
        self._procs: Dict[str, _Process] = {}
        # Children still to reap that no exec_id names any more (failed during CREATING).
        self._orphans: List[_Process] = []
        self._exited_order: Deque[str] = deque()
        # Warm-up containers still running: no exec_id, no events, reaped through their pidfds.
        self._warm_ups: List[_Process] = []
        self._mountinfo_path = mountinfo_path
        self._mount = mount
        self._contain_path = contain_path
        self._warm_up_rootfs = warm_up_rootfs

    # --- requests --------------------------------------------------------------------------------

    def create(self, request_id: int, request: agent_pb2.CreateProcessRequest) -> List[agent_pb2.GuestMessage]:
        """Spawn the process; the answer once the child is set up (here, or from handle_ready())."""
        received = time.monotonic()
        existing = self._procs.get(request.exec_id)
        if existing is not None and existing.state != EXITED:
            raise RequestError(f"exec_id {request.exec_id!r} is already in use by process "
                               f"{existing.pid} ({existing.state})")
        plan = CreatePlan(request, self._contain_path, self._container_init(request))
        planned = time.monotonic()
        if request.guest_root:
            # Uncontained (host-trusted tests): the guest's own mounts and hostname.
            if request.rootfs_readonly:
                mounts.make_read_only(plan.rootfs, self._mountinfo_path, self._mount)
            if request.hostname:
                _set_hostname(request.hostname)
        proc = self._spawn(plan)
        proc.create_request = request_id
        if request.trace_timing:
            proc.marks = [("received", received), ("planned", planned), ("spawned", time.monotonic())]
        if existing is not None:
            self._forget(existing.exec_id)
        self._procs[plan.exec_id] = proc
        return self._await_status(proc, CREATING)

    def _container_init(self, request: agent_pb2.CreateProcessRequest) -> Tuple[int, int]:
        """(init pid, its parent) of the container an exec joins; (0, 0) for a new container."""
        if not request.container_exec_id or request.guest_root:
            return 0, 0
        container = self._procs.get(request.container_exec_id)
        if container is None or container.state == EXITED or not container.init_pid:
            state = "unknown" if container is None else self._describe(container)
            raise RequestError(f"container {request.container_exec_id!r} to exec in is not running ({state})")
        return container.init_pid, container.pid

    def start(self, request_id: int, exec_id: str) -> List[agent_pb2.GuestMessage]:
        proc = self._get(exec_id)
        if proc.state == CREATING and proc.start_request is None:
            # A host may pipeline StartProcess behind CreateProcess: start once it is set up.
            proc.start_request = request_id
            proc.start_early = True
            return []
        if proc.state != CREATED:
            raise RequestError(f"process {exec_id!r} is {self._describe(proc)}, not created")
        self._release(proc, request_id)
        return self._await_status(proc, STARTING)

    def _await_status(self, proc: _Process, state: str) -> List[agent_pb2.GuestMessage]:
        """What the helper says while `proc` is in `state` (set up, or exec'd), waited for here
        for up to STATUS_WAIT_S. On one vCPU the helper runs only while the agent waits: going
        back to the service loop first put the loop's Python work ahead of the set-up (~5 ms
        under TCG) and a loop turn after it. Past the bound the loop reads it as for any fd."""
        deadline = time.monotonic() + STATUS_WAIT_S
        messages: List[agent_pb2.GuestMessage] = []
        while proc.state == state and proc.status_fd is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            poller = select.poll()
            poller.register(proc.status_fd, _READ)
            if not poller.poll(math.ceil(remaining * 1000)):
                break
            messages.extend(self._read_status(proc))
        return messages

    def _release(self, proc: _Process, request_id: Optional[int]) -> None:
        """Let the created child exec."""
        try:
            os.write(proc.start_fd, b"S")
        except BrokenPipeError:
            raise RequestError(f"process {proc.exec_id!r} is not running (it ended before it was started)") from None
        _close(proc.start_fd)
        proc.start_fd = None
        proc.state = STARTING
        proc.start_request = request_id

    def wait(self, request_id: int, exec_id: str) -> Optional[agent_pb2.GuestMessage]:
        proc = self._get(exec_id)
        if proc.state == EXITED:
            return self._wait_reply(request_id, proc)
        proc.waits.append(request_id)
        return None

    def signal(self, exec_id: str, signum: int) -> None:
        proc = self._get(exec_id)
        if not 1 <= signum <= MAX_SIGNAL:
            raise RequestError(f"signal {signum} is not a signal number (1..{MAX_SIGNAL})")
        if proc.state == EXITED:
            raise RequestError(f"process {exec_id!r} is not running (exited with status {proc.exit_status})")
        try:
            # Still a child of ours and unreaped, so the pid cannot have been reused.
            os.kill(proc.pid, signum)
        except ProcessLookupError:
            raise RequestError(f"process {exec_id!r} is not running") from None

    def write_stdin(self, request_id: int, exec_id: str, data: bytes) -> List[agent_pb2.GuestMessage]:
        proc = self._stdin_of(exec_id)
        proc.stdin_queue.append(_StdinItem(request_id, data))
        if data:
            proc.stdin_at_line_start = data[-1:] in (b"\n", b"\r")
        return self._pump_stdin(proc)

    def close_stdin(self, request_id: int, exec_id: str) -> List[agent_pb2.GuestMessage]:
        proc = self._stdin_of(exec_id)
        proc.stdin_closing = True
        if proc.terminal_fd is not None:
            # Closing our copy of the master would not end the process's input (the master stays
            # open for its output): the terminal's end-of-file character does, as typed.
            proc.stdin_queue.append(_StdinItem(None, _terminal_eof(proc.terminal_fd, proc.stdin_at_line_start)))
        proc.stdin_queue.append(_StdinItem(request_id, close=True))
        return self._pump_stdin(proc)

    def resize(self, exec_id: str, rows: int, cols: int) -> None:
        proc = self._get(exec_id)
        if not proc.terminal:
            raise RequestError(f"process {exec_id!r} has no terminal (create it with terminal)")
        if proc.state == EXITED:
            raise RequestError(f"process {exec_id!r} is not running (exited with status {proc.exit_status})")
        if proc.terminal_fd is None:
            raise RequestError(f"process {exec_id!r} is {proc.state}: its terminal exists once CreateProcess "
                               "is answered")
        if rows > MAX_WINSIZE or cols > MAX_WINSIZE:
            raise RequestError(f"terminal size {rows}x{cols} is over {MAX_WINSIZE} rows or columns")
        # On the master, TIOCSWINSZ sets the slave's size and signals its foreground group.
        fcntl.ioctl(proc.terminal_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def warm_up(self, request_id: int, reply_kind: str) -> bool:
        """Runs one throw-away container through the steps a real one takes (spawn, namespaces,
        mounts, pivot_root, credentials, exec) and answers request `request_id` with an empty
        `reply_kind` reply when it is done. False (and nothing owed) if none could be started.

        Under TCG, code a QEMU process runs for the first time is translated first, and a clone
        is a new QEMU process: its first CreateProcess took ~130 ms, the next ones ~30 ms. A VM
        cache pays this before it parks the VM; a VM made on demand pays it instead of its first
        container."""
        if self._warm_ups:
            return False
        try:
            os.makedirs(self._warm_up_rootfs, exist_ok=True)
            request = agent_pb2.CreateProcessRequest(exec_id=WARM_UP_ID, args=WARM_UP_ARGS,
                                                     rootfs=self._warm_up_rootfs, hostname=WARM_UP_ID, cwd="/")
            proc = self._spawn(CreatePlan(request, self._contain_path))
        except (OSError, RequestError) as exc:
            log(f"warm-up container not started: {exc}")
            return False
        proc.marks = [("spawned", time.monotonic())]
        proc.create_request, proc.warm_up_reply = request_id, reply_kind
        assert proc.start_fd is not None
        os.write(proc.start_fd, b"S")  # read once set up: it execs at once
        _close(proc.start_fd)
        proc.start_fd = None
        for fd in proc.outputs:
            _close(fd)
        proc.outputs = {}
        self._warm_ups.append(proc)
        return True

    def cancel_replies(self) -> int:
        """Forget the requests waiting for an answer (their host left); the processes go on."""
        count = 0
        for proc in self._warm_ups:
            count += proc.create_request is not None
            proc.create_request = None
        for proc in self._procs.values():
            count += len(proc.waits) + (proc.create_request is not None) + (proc.start_request is not None)
            count += sum(1 for item in proc.stdin_queue if item.request_id is not None)
            proc.waits = []
            proc.create_request = proc.start_request = None
            for item in proc.stdin_queue:
                item.request_id = None  # the data still goes to the process
        return count

    # --- the service loop ------------------------------------------------------------------------

    def poll_fds(self, read_output: bool = True) -> Dict[int, int]:
        """fd -> poll events to watch. Output is left unread while the host is behind
        (`read_output` False): the process then blocks on a full pipe instead of the agent
        buffering without bound."""
        fds: Dict[int, int] = {}
        for proc in self._procs.values():
            if proc.pidfd is not None:
                fds[proc.pidfd] = _READ
            if proc.status_fd is not None:
                fds[proc.status_fd] = _READ
            if proc.stdin_fd is not None and proc.stdin_queue:
                fds[proc.stdin_fd] = _WRITE
            if read_output:
                for fd in proc.outputs:
                    fds[fd] = _READ
        for proc in self._orphans + self._warm_ups:
            if proc.pidfd is not None:
                fds[proc.pidfd] = _READ
        return fds

    def handle_ready(self, ready: Dict[int, int]) -> List[agent_pb2.GuestMessage]:
        messages: List[agent_pb2.GuestMessage] = []
        exited: List[_Process] = []
        for proc in list(self._procs.values()):
            if proc.status_fd is not None and proc.status_fd in ready:
                messages.extend(self._read_status(proc))
            for fd in [fd for fd in proc.outputs if fd in ready]:
                messages.extend(self._read_output(proc, fd))
            if proc.stdin_fd is not None and proc.stdin_fd in ready:
                messages.extend(self._pump_stdin(proc))
            if proc.pidfd is not None and proc.pidfd in ready:
                exited.append(proc)
        exited.extend(p for p in self._orphans if p.pidfd is not None and p.pidfd in ready and p not in exited)
        for proc in exited:
            messages.extend(self._try_reap(proc))
        for proc in [p for p in self._warm_ups if p.pidfd is not None and p.pidfd in ready]:
            messages.extend(self._reap_warm_up(proc))
        return messages

    def reap(self) -> List[agent_pb2.GuestMessage]:
        """Collect every child that has exited (cheap: one waitpid(WNOHANG) per live child)."""
        messages: List[agent_pb2.GuestMessage] = []
        for proc in [p for p in self._procs.values() if p.state != EXITED] + list(self._orphans):
            messages.extend(self._try_reap(proc))
        for proc in list(self._warm_ups):
            messages.extend(self._reap_warm_up(proc))
        return messages

    def seconds_until_reap(self) -> Optional[float]:
        """When the loop must look for exits by itself: only for children without a pidfd."""
        live = [p for p in self._procs.values() if p.state != EXITED] + self._orphans + self._warm_ups
        return REAP_POLL_S if any(p.pidfd is None for p in live) else None

    def close(self) -> None:
        """Release the agent's fds (the processes keep running)."""
        for proc in list(self._procs.values()) + self._orphans + self._warm_ups:
            for fd in proc.fds():
                _close(fd)

    # --- internals -------------------------------------------------------------------------------

    def _get(self, exec_id: str) -> _Process:
        proc = self._procs.get(exec_id)
        if proc is None:
            raise RequestError(f"no process with exec_id {exec_id!r}")
        return proc

    @staticmethod
    def _describe(proc: _Process) -> str:
        if proc.state == EXITED:
            return f"not running (exited with status {proc.exit_status})"
        return proc.state

    def _stdin_of(self, exec_id: str) -> _Process:
        proc = self._get(exec_id)
        if not proc.has_stdin:
            raise RequestError(f"process {exec_id!r} has no stdin pipe (create it with open_stdin)")
        if proc.state == EXITED:
            raise RequestError(f"process {exec_id!r} is not running (exited with status {proc.exit_status})")
        if proc.stdin_closing or proc.stdin_fd is None:
            raise RequestError(f"stdin of process {exec_id!r} is closed")
        return proc

    def _reap_warm_up(self, proc: _Process) -> List[agent_pb2.GuestMessage]:
        try:
            pid, wait_status = os.waitpid(proc.pid, os.WNOHANG)
        except ChildProcessError:
            pid, wait_status = proc.pid, 0
        if pid == 0:
            return []
        self._warm_ups.remove(proc)
        said = b""
        try:
            said = os.read(proc.status_fd, 4096) if proc.status_fd is not None else b""
        except OSError:
            pass
        took_ms = (time.monotonic() - proc.marks[0][1]) * 1000
        if exit_status_of(wait_status) == 0:
            log(f"warm-up container done in {took_ms:.0f} ms")
        else:
            # Not the host's business, but a broken helper shows here first.
            why = said.partition(b"E")[2].decode("utf-8", "replace")
            log(f"warm-up container exited with status {exit_status_of(wait_status)} after {took_ms:.0f} ms: "
                f"{why or 'no reason given'}")
        for fd in proc.fds():
            _close(fd)
        if proc.create_request is None:  # its host left
            return []
        return [reply_message(proc.create_request, proc.warm_up_reply)]

    def _spawn(self, plan: CreatePlan) -> _Process:
        parent_fds: List[int] = []
        # In the helper's order (guest/contain/contain.c): stdin, stdout, stderr, status pipe,
        # start pipe, and with a terminal the console socket. One fd may stand at several places.
        child_fds: List[int] = []
        in_w: Optional[int] = None
        out_r = err_r = console_fd = None
        try:
            if plan.terminal:
                # Neither the helper nor the container's init holds the terminal: only the program.
                null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                child_fds += [null, null, null]
            else:
                if plan.open_stdin:
                    in_r, in_w = os.pipe2(os.O_CLOEXEC)
                    child_fds.append(in_r), parent_fds.append(in_w)
                else:
                    child_fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
                out_r, out_w = os.pipe2(os.O_CLOEXEC)
                parent_fds.append(out_r), child_fds.append(out_w)
                err_r, err_w = os.pipe2(os.O_CLOEXEC)
                parent_fds.append(err_r), child_fds.append(err_w)
            status_r, status_w = os.pipe2(os.O_CLOEXEC)
            parent_fds.append(status_r), child_fds.append(status_w)
            start_r, start_w = os.pipe2(os.O_CLOEXEC)
            child_fds.append(start_r), parent_fds.append(start_w)
            if plan.terminal:
                ours, helpers = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                console_fd = ours.detach()
                parent_fds.append(console_fd), child_fds.append(helpers.detach())
            # Copies above the helper's fds, so no dup2 onto one of them clobbers one still to come.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, len(child_fds)) for fd in child_fds]
            child_fds.extend(high)
            try:
                pid = os.posix_spawn(
                    plan.argv[0], plan.argv, plan.env,
                    file_actions=[(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(high)],
                    setsid=True,  # its own session: the agent's signals stay the agent's
                    setsigmask=(),
                )
            except OSError as exc:
                raise RequestError(f"spawn {plan.argv[0]} for process {plan.exec_id!r}: {exc.strerror}") from None
        except BaseException:
            for fd in parent_fds + list(set(child_fds)):
                _close(fd)
            raise
        for fd in set(child_fds):
            _close(fd)
        proc = _Process(plan.exec_id, pid)
        proc.status_fd, proc.start_fd = status_r, start_w
        if out_r is not None and err_r is not None:
            proc.outputs = {out_r: STDOUT, err_r: STDERR}
        proc.stdin_fd, proc.has_stdin = in_w, plan.open_stdin or plan.terminal
        proc.terminal, proc.console_fd = plan.terminal, console_fd
        for fd in parent_fds:
            _set_nonblocking(fd)
        try:
            # Readable when the child exits: the loop wakes for exits with no signal handling.
            proc.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError) as exc:
            log(f"pidfd_open({pid}) failed ({exc}); relying on SIGCHLD and polling for its exit")
        return proc

    def _read_status(self, proc: _Process) -> List[agent_pb2.GuestMessage]:
        """What the child said on its status pipe: "R" set up, "E<why>" failed, EOF exec'd/died."""
        eof = False
        while True:
            try:
                chunk = os.read(proc.status_fd, 4096)
            except BlockingIOError:
                break
            if not chunk:
                eof = True
                break
            proc.status_data += chunk
        messages: List[agent_pb2.GuestMessage] = []
        if proc.status_data.startswith(b"C") and b"\n" in proc.status_data:
            line, _, proc.status_data = proc.status_data.partition(b"\n")
            proc.init_pid = int(line[1:]) if line[1:].isdigit() else 0
        if proc.state == CREATING and proc.status_data.startswith(b"R"):
            proc.status_data = proc.status_data[1:]
            if proc.console_fd is not None:
                try:
                    self._take_terminal(proc)
                except RequestError as exc:
                    os.kill(proc.pid, signal.SIGKILL)  # unreaped: the pid is still this child's
                    return messages + self._abandon(proc, str(exc))
            proc.state = CREATED
            if proc.marks:
                proc.marks.append(("ready", time.monotonic()))  # logged at the exit: the console is slow
            if proc.create_request is not None:
                reply = reply_message(proc.create_request, "create_process")
                reply.response.create_process.pid = proc.pid
                messages.append(reply)
                proc.create_request = None
            if proc.start_early:
                proc.start_early = False
                request_id, proc.start_request = proc.start_request, None
                try:
                    self._release(proc, request_id)
                except RequestError as exc:
                    if request_id is not None:
                        messages.append(response_message(request_id, f"start_process: {exc}"))
        if proc.status_data.startswith(b"C") and b"\n" in proc.status_data:  # said after "R"
            line, _, proc.status_data = proc.status_data.partition(b"\n")
            proc.init_pid = int(line[1:]) if line[1:].isdigit() else 0
        if not eof:
            return messages
        _close(proc.status_fd)
        proc.status_fd = None
        error = proc.status_data[1:].decode("utf-8", "replace") if proc.status_data.startswith(b"E") else ""
        if proc.state == CREATING:
            messages.extend(self._abandon(proc, error or "the child ended while setting up"))
        elif proc.state == STARTING:
            proc.state = RUNNING
            if proc.start_request is not None:
                if error:
                    messages.append(response_message(proc.start_request,
                                                     f"start_process: process {proc.exec_id!r}: {error}"))
                else:
                    messages.append(reply_message(proc.start_request, "start_process"))
                proc.start_request = None
            if error:
                log(f"process {proc.exec_id!r} failed to start: {error}")
        # In CREATED, EOF means a signal killed the waiting child: its exit says the rest.
        return messages

    def _abandon(self, proc: _Process, why: str) -> List[agent_pb2.GuestMessage]:
        """A child that failed while CREATING was never created: CreateProcess gets the error and
        the child is reaped without an event."""
        messages: List[agent_pb2.GuestMessage] = []
        if proc.create_request is not None:
            messages.append(response_message(proc.create_request, f"create_process: process {proc.exec_id!r}: {why}"))
        if proc.start_request is not None:
            messages.append(response_message(proc.start_request,
                                             f"start_process: process {proc.exec_id!r} was never created: {why}"))
        log(f"process {proc.exec_id!r} failed to set up: {why}")
        self._procs.pop(proc.exec_id, None)
        self._close_pipes(proc)
        self._orphans.append(proc)
        return messages

    def _take_terminal(self, proc: _Process) -> None:
        """The master the program sent before it said "R", so it is queued already."""
        assert proc.console_fd is not None
        console = socket.socket(fileno=proc.console_fd)
        proc.console_fd = None
        try:
            _, fds, _, _ = socket.recv_fds(console, CONSOLE_MESSAGE_BYTES, 1, socket.MSG_CMSG_CLOEXEC)
        except OSError as exc:  # BlockingIOError included: the helper said "R" without sending it
            raise RequestError(f"the process's terminal did not arrive from the helper ({exc})") from None
        finally:
            console.close()
        if len(fds) != 1:
            for fd in fds:
                _close(fd)
            raise RequestError(f"the helper sent {len(fds)} fds for the process's terminal, not its master")
        master = fds[0]
        _set_nonblocking(master)
        # One fd per role: reading ends at EIO, CloseStdin closes the writer, ResizeConsole needs
        # the master until the exit whatever the other two did.
        proc.terminal_fd = master
        proc.outputs = {os.dup(master): STDOUT}
        proc.stdin_fd = os.dup(master)

    def _read_output(self, proc: _Process, fd: int) -> List[agent_pb2.GuestMessage]:
        try:
            data = os.read(fd, OUTPUT_CHUNK_BYTES)
        except BlockingIOError:
            return []
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            data = b""  # a terminal's master once no slave is open: the end of its output
        if not data:
            _close(fd)
            del proc.outputs[fd]
            return []
        return [self._output_event(proc, proc.outputs[fd], data)]

    @staticmethod
    def _output_event(proc: _Process, stream: int, data: bytes) -> agent_pb2.GuestMessage:
        message = _event("process_output")
        output = message.event.process_output
        output.exec_id = proc.exec_id
        output.stream = stream
        output.data = data
        return message

    def _drain_output(self, proc: _Process) -> List[agent_pb2.GuestMessage]:
        """Everything the pipes hold now. Stops at EAGAIN, not EOF: a background child of the
        process may hold the pipe open for as long as it likes."""
        messages: List[agent_pb2.GuestMessage] = []
        for fd in list(proc.outputs):
            while fd in proc.outputs:
                chunk = self._read_output(proc, fd)
                if not chunk:
                    break
                messages.extend(chunk)
        return messages

    def _pump_stdin(self, proc: _Process) -> List[agent_pb2.GuestMessage]:
        messages: List[agent_pb2.GuestMessage] = []
        while proc.stdin_queue:
            item = proc.stdin_queue[0]
            if item.close:
                _close(proc.stdin_fd)
                proc.stdin_fd = None
                proc.stdin_queue.popleft()
                if item.request_id is not None:
                    messages.append(reply_message(item.request_id, "close_stdin"))
                continue
            try:
                written = os.write(proc.stdin_fd, item.data) if item.data else 0
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.EIO):  # EIO: a terminal nobody holds
                    raise
                messages.extend(self._fail_stdin(proc, f"process {proc.exec_id!r} closed its stdin"))
                break
            item.data = item.data[written:]
            if not item.data:
                proc.stdin_queue.popleft()
                if item.request_id is not None:
                    messages.append(reply_message(item.request_id, "write_stdin"))
        return messages

    def _fail_stdin(self, proc: _Process, why: str) -> List[agent_pb2.GuestMessage]:
        messages = []
        for item in proc.stdin_queue:
            if item.request_id is None:
                continue
            kind = "close_stdin" if item.close else "write_stdin"
            unsent = f" ({len(item.data)} bytes not written)" if item.data else ""
            messages.append(response_message(item.request_id, f"{kind}: {why}{unsent}"))
        proc.stdin_queue.clear()
        _close(proc.stdin_fd)
        proc.stdin_fd = None
        return messages

    def _try_reap(self, proc: _Process) -> List[agent_pb2.GuestMessage]:
        if proc.reaped:
            return []
        try:
            pid, wait_status = os.waitpid(proc.pid, os.WNOHANG)
        except ChildProcessError:
            # Someone else reaped it (nothing in the agent does): the status is lost.
            log(f"process {proc.exec_id!r} (pid {proc.pid}) was reaped elsewhere; reporting status 255")
            pid, wait_status = proc.pid, 255 << 8
        if pid == 0:
            return []
        proc.reaped = True
        return self._exited(proc, exit_status_of(wait_status))

    def _exited(self, proc: _Process, status: int) -> List[agent_pb2.GuestMessage]:
        messages: List[agent_pb2.GuestMessage] = []
        if proc.status_fd is not None:
            messages.extend(self._read_status(proc))  # the child is gone: this reaches EOF
        _close(proc.pidfd)
        proc.pidfd = None
        if proc in self._orphans:
            self._orphans.remove(proc)
            return messages
        messages.extend(self._drain_output(proc))
        self._close_pipes(proc)
        messages.extend(self._fail_stdin(proc, f"process {proc.exec_id!r} exited with status {status}"))
        proc.state = EXITED
        proc.exit_status = status
        event = _event("process_exited")
        event.event.process_exited.exec_id = proc.exec_id
        event.event.process_exited.exit_status = status
        messages.append(event)
        for request_id in proc.waits:
            messages.append(self._wait_reply(request_id, proc))
        proc.waits = []
        if proc.start_request is not None:  # the exec's verdict never came (cannot happen: EOF first)
            messages.append(response_message(proc.start_request,
                                             f"start_process: process {proc.exec_id!r} exited with status {status}"))
            proc.start_request = None
        log(f"process {proc.exec_id!r} (pid {proc.pid}) exited with status {status}")
        if proc.marks:
            _log_marks(proc)
        self._exited_order.append(proc.exec_id)
        while len(self._exited_order) > MAX_EXITED_KEPT:
            old = self._exited_order.popleft()
            if old in self._procs and self._procs[old].state == EXITED:
                del self._procs[old]
        return messages

    def _close_pipes(self, proc: _Process) -> None:
        for fd in list(proc.outputs):
            _close(fd)
        proc.outputs = {}
        _close(proc.console_fd)
        _close(proc.terminal_fd)
        proc.console_fd = proc.terminal_fd = None
        _close(proc.start_fd)
        proc.start_fd = None
        if proc.status_fd is not None:
            _close(proc.status_fd)
            proc.status_fd = None

    def _forget(self, exec_id: str) -> None:
        self._procs.pop(exec_id, None)
        try:
            self._exited_order.remove(exec_id)
        except ValueError:
            pass

    @staticmethod
    def _wait_reply(request_id: int, proc: _Process) -> agent_pb2.GuestMessage:
        message = reply_message(request_id, "wait_process")
        message.response.wait_process.exit_status = proc.exit_status
        return message


def _log_marks(proc: _Process) -> None:
    """The agent's share of a traced CreateProcess (the helper's is on the process's stderr)."""
    start = proc.marks[0][1]
    steps = " ".join(f"{what}=+{(at - before) * 1e6:.0f}us"
                     for (_, before), (what, at) in zip(proc.marks, proc.marks[1:]))
    log(f"create_process {proc.exec_id!r} timing: received={start:.6f} {steps} "
        f"total={(proc.marks[-1][1] - start) * 1e6:.0f}us")
    proc.marks = []


def _terminal_eof(master: int, at_line_start: bool) -> bytes:
    """What ends a terminal's input as typed: its VEOF character at the start of a line (once
    more after a partial line, which the first one only hands over); nothing in raw mode."""
    try:
        attrs = termios.tcgetattr(master)  # on a master: the slave's settings
    except termios.error:
        return b""
    if not attrs[3] & termios.ICANON:
        return b""
    veof = bytes(attrs[6][termios.VEOF])
    return veof if at_line_start else veof * 2


def _set_hostname(hostname: str) -> None:
    if len(hostname.encode()) > 64:
        raise RequestError(f"hostname {hostname!r} is longer than 64 bytes")
    if socket.gethostname() == hostname:
        return  # no privilege needed to keep it (host-side tests)
    try:
        socket.sethostname(hostname)
    except OSError as exc:
        raise RequestError(f"sethostname {hostname!r}: {exc.strerror}") from exc
