"""Process execution in the guest agent (processes.py, mounts.py) and its helper, run on the host.

Real fork and exec with rootfs "/" (the host's own /bin/sh): pipes, exit statuses, signals and
stdin are the real thing. chroot, other uids and real mounts need privileges Bazel's sandbox may
drop; those tests skip themselves, and the VM integration tests cover them.
"""
import os
import select
import shutil
import signal
import socket
import time

import pytest

from guest.agent import mounts
from guest.agent.fakeroot import FakeGuest
from guest.agent.handler import AgentHandler
from guest.agent.processes import OUTPUT_CHUNK_BYTES, WARM_UP_ROOTFS, exit_status_of
from guest.agent.service import MAX_QUEUED_EVENTS, AgentService
from protocols.agent import agent_pb2
from protocols.agent.framing import FrameDecoder, encode_frame

HOST_ENV = ["PATH=/usr/local/bin:/usr/bin:/bin", "LC_ALL=C"]


class MountCalls(list):
    def __call__(self, source, target, fstype, flags, data):
        self.append((source, target, fstype, flags, data))


class Guest:
    """The handler plus a minimal loop (what service.py does with its fds) and what it said."""

    def __init__(self, directory: str, warm_up: bool = False) -> None:
        self.fake = FakeGuest(directory)
        self.mounts = MountCalls()
        self.handler = AgentHandler(self.fake.root, mount=self.mounts, warm_up=warm_up)
        self.messages = []
        self.next_id = 100

    def send(self, **kind):
        self.next_id += 1
        request = agent_pb2.Request(id=self.next_id, **kind)
        self.messages.extend(self.handler.handle_frame(request.SerializeToString()))
        return self.next_id

    def pump(self, timeout: float = 0.05) -> None:
        poller = select.poll()
        fds = self.handler.poll_fds()
        for fd, events in fds.items():
            poller.register(fd, events)
        ready = dict(poller.poll(timeout * 1000)) if fds else {}
        if not fds:
            time.sleep(timeout)
        if ready:
            self.messages.extend(self.handler.handle_fds(ready))
        self.messages.extend(self.handler.tick())

    def response(self, request_id: int, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages:
                if message.WhichOneof("kind") == "response" and message.response.id == request_id:
                    return message.response
            assert time.monotonic() < deadline, f"no response to request {request_id}: {self.messages}"
            self.pump()

    def events(self, exec_id: str):
        return [m.event for m in self.messages if m.WhichOneof("kind") == "event"
                and getattr(m.event, m.event.WhichOneof("kind")).exec_id == exec_id]

    def exited(self, exec_id: str, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            done = [e.process_exited.exit_status for e in self.events(exec_id)
                    if e.WhichOneof("kind") == "process_exited"]
            if done:
                return done[0]
            assert time.monotonic() < deadline, f"process {exec_id} did not exit: {self.messages}"
            self.pump()

    def output(self, exec_id: str, stream: int = 1) -> bytes:
        return b"".join(e.process_output.data for e in self.events(exec_id)
                        if e.WhichOneof("kind") == "process_output" and e.process_output.stream == stream)

    def create(self, exec_id: str, args, **fields):
        fields.setdefault("env", HOST_ENV)
        fields.setdefault("rootfs", "/")
        # Host-side tests run uncontained (no privilege for namespaces); a rootfs of its own
        # asks for a container.
        fields.setdefault("guest_root", fields["rootfs"] == "/")
        fields.setdefault("cwd", "/")
        fields.setdefault("uid", os.getuid())
        fields.setdefault("gid", os.getgid())
        fields.setdefault("additional_gids", os.getgroups())
        request_id = self.send(create_process=agent_pb2.CreateProcessRequest(exec_id=exec_id, args=args, **fields))
        return self.response(request_id)

    def run(self, exec_id: str, args, **fields) -> int:
        created = self.create(exec_id, args, **fields)
        assert created.error == "" and created.create_process.pid > 0, created
        started = self.response(self.send(start_process=agent_pb2.StartProcessRequest(exec_id=exec_id)))
        assert started.error == "", started
        return self.exited(exec_id)

    def close(self) -> None:
        for proc in list(self.handler.processes._procs.values()):
            if proc.state != "exited":
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                os.waitpid(proc.pid, 0)
        self.handler.processes.close()


@pytest.fixture
def guest(tmp_path):
    g = Guest(str(tmp_path / "guest"))
    yield g
    g.close()


# --- running processes -------------------------------------------------------------------------------


def test_output_then_exit_status(guest):
    assert guest.run("p1", ["sh", "-c", "echo hi; echo oops >&2; exit 3"]) == 3
    assert guest.output("p1", 1) == b"hi\n"
    assert guest.output("p1", 2) == b"oops\n"
    kinds = [e.WhichOneof("kind") for e in guest.events("p1")]
    assert kinds[-1] == "process_exited" and kinds.count("process_exited") == 1


def test_create_reports_the_pid_of_a_waiting_child(guest):
    created = guest.create("p1", ["sh", "-c", "echo started"])
    pid = created.create_process.pid
    # Not exec'd yet: still the helper, waiting for its start byte.
    assert os.path.basename(os.path.realpath(f"/proc/{pid}/exe")) == "vmf-contain"
    time.sleep(0.2)
    guest.pump()
    assert guest.output("p1") == b""  # nothing runs before StartProcess
    guest.response(guest.send(start_process=agent_pb2.StartProcessRequest(exec_id="p1")))
    assert guest.exited("p1") == 0 and guest.output("p1") == b"started\n"


def test_start_may_be_pipelined_behind_create(guest):
    create = guest.send(create_process=agent_pb2.CreateProcessRequest(
        exec_id="p1", args=["echo", "early"], env=HOST_ENV, rootfs="/", cwd="/", uid=os.getuid(), gid=os.getgid(),
        additional_gids=os.getgroups(), guest_root=True))
    start = guest.send(start_process=agent_pb2.StartProcessRequest(exec_id="p1"))  # before create's answer
    assert guest.response(create).error == "" and guest.response(start).error == ""
    assert guest.exited("p1") == 0 and guest.output("p1") == b"early\n"


def test_env_and_cwd_reach_the_process(guest, tmp_path):
    assert guest.run("p1", ["sh", "-c", 'echo "$GREETING $(pwd)"'], env=HOST_ENV + ["GREETING=hello"],
                     cwd=str(tmp_path)) == 0
    assert guest.output("p1") == f"hello {tmp_path}\n".encode()


def test_the_process_gets_its_own_session_and_default_sigpipe(guest):
    # Python ignores SIGPIPE; an ignored signal survives exec, and "yes | head" would then spin.
    assert guest.run("p1", ["sh", "-c", 'grep SigIgn /proc/self/status; echo $$; cut -d" " -f6 /proc/$$/stat']) == 0
    _, ignored, pid, session = guest.output("p1").decode().split()
    assert not int(ignored, 16) & (1 << (signal.SIGPIPE - 1))
    assert session == pid


def test_exit_by_signal_is_128_plus_the_signal(guest):
    assert guest.run("p1", ["sh", "-c", "kill -9 $$"]) == 128 + 9
    assert exit_status_of(0x0300) == 3


def test_signal_process_and_its_errors(guest):
    created = guest.create("p1", ["sleep", "30"])
    assert created.error == ""
    guest.response(guest.send(start_process=agent_pb2.StartProcessRequest(exec_id="p1")))
    reply = guest.response(guest.send(signal_process=agent_pb2.SignalProcessRequest(exec_id="p1", signal=15)))
    assert reply.error == "" and reply.WhichOneof("kind") == "signal_process"
    assert guest.exited("p1") == 128 + 15
    again = guest.response(guest.send(signal_process=agent_pb2.SignalProcessRequest(exec_id="p1", signal=15)))
    assert "not running" in again.error and "143" in again.error
    unknown = guest.response(guest.send(signal_process=agent_pb2.SignalProcessRequest(exec_id="nope", signal=9)))
    assert "'nope'" in unknown.error


def test_signal_number_is_checked(guest):
    guest.create("p1", ["sleep", "30"])
    bad = guest.response(guest.send(signal_process=agent_pb2.SignalProcessRequest(exec_id="p1", signal=99)))
    assert "signal 99" in bad.error


def test_killing_a_created_process_ends_it_and_start_then_fails(guest):
    guest.create("p1", ["sleep", "30"])
    guest.response(guest.send(signal_process=agent_pb2.SignalProcessRequest(exec_id="p1", signal=9)))
    assert guest.exited("p1") == 137
    start = guest.response(guest.send(start_process=agent_pb2.StartProcessRequest(exec_id="p1")))
    assert "p1" in start.error and "not running" in start.error


def test_wait_is_answered_at_exit_and_again_later(guest):
    guest.create("p1", ["sh", "-c", "sleep 0.3; exit 5"])
    waiting = guest.send(wait_process=agent_pb2.WaitProcessRequest(exec_id="p1"))
    guest.pump()
    assert not [m for m in guest.messages if m.response.id == waiting]
    guest.response(guest.send(start_process=agent_pb2.StartProcessRequest(exec_id="p1")))
    assert guest.response(waiting).wait_process.exit_status == 5
    late = guest.response(guest.send(wait_process=agent_pb2.WaitProcessRequest(exec_id="p1")))
    assert late.wait_process.exit_status == 5


def test_a_host_leaving_drops_answers_but_not_the_exit_event(guest):
    guest.create("p1", ["sh", "-c", "sleep 0.2; echo bye"])
    waiting = guest.send(wait_process=agent_pb2.WaitProcessRequest(exec_id="p1"))
    assert guest.response(guest.send(start_process=agent_pb2.StartProcessRequest(exec_id="p1"))).error == ""
    assert guest.handler.cancel_pending() == 1
    assert guest.exited("p1") == 0 and guest.output("p1") == b"bye\n"
    assert not [m for m in guest.messages if m.response.id == waiting]


def test_exec_id_in_use_is_refused_until_the_process_exits(guest):
    guest.create("p1", ["sleep", "30"])
    again = guest.create("p1", ["true"])
    assert "exec_id 'p1' is already in use" in again.error
    guest.response(guest.send(signal_process=agent_pb2.SignalProcessRequest(exec_id="p1", signal=9)))
    guest.exited("p1")
    guest.messages.clear()  # the events of the first p1
    assert guest.run("p1", ["true"]) == 0


# --- errors before anything runs ------------------------------------------------------------------


def test_missing_executable_is_an_error_at_create(guest):
    created = guest.create("p1", ["no-such-program-xyz"])
    assert "executable 'no-such-program-xyz' not found in rootfs /" in created.error
    assert "PATH=/usr/local/bin:/usr/bin:/bin" in created.error
    assert guest.handler.processes._procs == {}  # nothing was forked


def test_relative_and_absolute_program_paths(guest, tmp_path):
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/sh\necho from script\n")
    script.chmod(0o755)
    assert guest.run("p1", [str(script)]) == 0
    assert guest.run("p2", ["./hello.sh"], cwd=str(tmp_path)) == 0
    assert guest.output("p1") == guest.output("p2") == b"from script\n"
    not_exec = tmp_path / "data.txt"
    not_exec.write_text("x")
    created = guest.create("p3", [str(not_exec)])
    assert "is not an executable file" in created.error


def test_the_program_is_searched_in_path_as_execvp_does(guest, tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    (tmp_path / "a" / "prog").write_text("#!/bin/sh\necho a\n")  # not executable: skipped
    (tmp_path / "b" / "prog").write_text("#!/bin/sh\necho b\n")
    (tmp_path / "b" / "prog").chmod(0o755)
    path = f"PATH={tmp_path}/a:{tmp_path}/b"
    assert guest.run("p1", ["prog"], env=[path]) == 0
    assert guest.output("p1") == b"b\n"
    assert guest.run("p2", ["prog"], env=["PATH=/nonexistent:"], cwd=str(tmp_path / "b")) == 0  # "": the cwd
    assert guest.output("p2") == b"b\n"
    created = guest.create("p3", ["prog"], env=[f"PATH={tmp_path}/a"])
    assert f"{tmp_path}/a/prog is not an executable file (PATH={tmp_path}/a)" in created.error


def test_missing_cwd_is_an_error_at_create(guest):
    created = guest.create("p1", ["true"], cwd="/no/such/dir")
    assert "chdir /no/such/dir" in created.error and "No such file or directory" in created.error
    assert guest.handler.processes._procs == {}
    # The failed child is reaped quietly: no events for a process that was never created.
    for _ in range(20):
        guest.pump(0.01)
    assert guest.events("p1") == [] and guest.handler.processes._orphans == []


def test_exec_failure_is_an_error_at_start_and_exit_126(guest, tmp_path):
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"\x7fELF not really")
    bogus.chmod(0o755)
    assert guest.create("p1", [str(bogus)]).error == ""
    started = guest.response(guest.send(start_process=agent_pb2.StartProcessRequest(exec_id="p1")))
    assert f"exec {bogus}" in started.error and "Exec format error" in started.error
    assert guest.exited("p1") == 126


@pytest.mark.parametrize("field,value,message", [
    ("exec_id", "", "exec_id is empty"),
    ("args", [], "args of process 'p1' are empty"),
    ("rootfs", "relative/root", "rootfs 'relative/root' is not an absolute"),
    ("rootfs", "/no/such/rootfs", "rootfs /no/such/rootfs is not a directory"),
    ("env", ["JUSTANAME"], "env entry 'JUSTANAME' is not NAME=value"),
    ("cwd", "tmp", "cwd 'tmp' is not an absolute path"),
    ("hostname", "h" * 65, "longer than 64 bytes"),
])
def test_create_validates_its_request(guest, field, value, message):
    fields = {"exec_id": "p1", "args": ["true"]}
    fields[field] = value
    exec_id, args = fields.pop("exec_id"), fields.pop("args")
    assert message in guest.create(exec_id, args, **fields).error


def test_keeping_the_current_hostname_needs_no_privilege(guest):
    assert guest.run("p1", ["hostname"], hostname=socket.gethostname()) == 0
    assert guest.output("p1").strip() == socket.gethostname().encode()


def test_unknown_exec_ids_are_named(guest):
    for request in (dict(start_process=agent_pb2.StartProcessRequest(exec_id="ghost")),
                    dict(wait_process=agent_pb2.WaitProcessRequest(exec_id="ghost")),
                    dict(write_stdin=agent_pb2.WriteStdinRequest(exec_id="ghost", data=b"x")),
                    dict(close_stdin=agent_pb2.CloseStdinRequest(exec_id="ghost"))):
        assert "no process with exec_id 'ghost'" in guest.response(guest.send(**request)).error


# --- stdin ---------------------------------------------------------------------------------------------


def test_stdin_is_dev_null_by_default(guest):
    assert guest.run("p1", ["cat"]) == 0 and guest.output("p1") == b""
    refused = guest.response(guest.send(write_stdin=agent_pb2.WriteStdinRequest(exec_id="p1", data=b"x")))
    assert "no stdin pipe" in refused.error


def test_write_and_close_stdin(guest):
    guest.create("p1", ["cat"], open_stdin=True)
    guest.response(guest.send(start_process=agent_pb2.StartProcessRequest(exec_id="p1")))
    written = guest.response(guest.send(write_stdin=agent_pb2.WriteStdinRequest(exec_id="p1", data=b"abc\n")))
    assert written.error == "" and written.WhichOneof("kind") == "write_stdin"
    closed = guest.response(guest.send(close_stdin=agent_pb2.CloseStdinRequest(exec_id="p1")))
    assert closed.error == ""
    assert guest.exited("p1") == 0 and guest.output("p1") == b"abc\n"
    after = guest.response(guest.send(write_stdin=agent_pb2.WriteStdinRequest(exec_id="p1", data=b"x")))
    assert "not running" in after.error


def test_large_stdin_is_answered_once_the_pipe_took_it(guest):
    data = os.urandom(1 << 20)
    guest.create("p1", ["cat"], open_stdin=True)
    guest.response(guest.send(start_process=agent_pb2.StartProcessRequest(exec_id="p1")))
    write = guest.send(write_stdin=agent_pb2.WriteStdinRequest(exec_id="p1", data=data))
    close = guest.send(close_stdin=agent_pb2.CloseStdinRequest(exec_id="p1"))
    assert guest.response(write).error == "" and guest.response(close).error == ""
    assert guest.exited("p1") == 0
    assert guest.output("p1") == data
    chunks = [e.process_output.data for e in guest.events("p1") if e.WhichOneof("kind") == "process_output"]
    assert max(len(c) for c in chunks) <= OUTPUT_CHUNK_BYTES


def test_stdin_writes_after_close_are_refused(guest):
    guest.create("p1", ["cat"], open_stdin=True)
    guest.response(guest.send(close_stdin=agent_pb2.CloseStdinRequest(exec_id="p1")))
    refused = guest.response(guest.send(write_stdin=agent_pb2.WriteStdinRequest(exec_id="p1", data=b"x")))
    assert "stdin of process 'p1' is closed" in refused.error


def test_pending_stdin_fails_when_the_process_exits(guest):
    guest.create("p1", ["sleep", "0.3"], open_stdin=True)  # never reads its stdin
    guest.response(guest.send(start_process=agent_pb2.StartProcessRequest(exec_id="p1")))
    write = guest.send(write_stdin=agent_pb2.WriteStdinRequest(exec_id="p1", data=bytes(1 << 20)))
    failed = guest.response(write)
    assert "p1" in failed.error and "bytes not written" in failed.error


def test_another_process_waiting_to_start_does_not_hold_stdin_open(guest):
    guest.create("reader", ["cat"], open_stdin=True)
    guest.response(guest.send(start_process=agent_pb2.StartProcessRequest(exec_id="reader")))
    guest.create("idle", ["true"])  # forked after the pipe exists, waiting for its start
    guest.response(guest.send(close_stdin=agent_pb2.CloseStdinRequest(exec_id="reader")))
    assert guest.exited("reader", timeout=5) == 0


# --- the service loop: backpressure ---------------------------------------------------------------------


def test_output_waits_in_the_pipe_while_the_host_is_behind(tmp_path):
    total = 16 << 20
    host_sock, guest_sock = socket.socketpair()
    guest_sock.setblocking(False)
    host_sock.setblocking(False)
    handler = AgentHandler(FakeGuest(str(tmp_path)).root)
    service = AgentService(guest_sock.fileno(), handler)
    decoder = FrameDecoder()
    received, exit_status, most_queued = 0, None, 0

    def ask(request_id, **kind):
        host_sock.sendall(encode_frame(agent_pb2.Request(id=request_id, **kind).SerializeToString()))

    try:
        ask(1, create_process=agent_pb2.CreateProcessRequest(
            exec_id="big", args=["head", "-c", str(total), "/dev/zero"], env=HOST_ENV, rootfs="/", cwd="/",
            uid=os.getuid(), gid=os.getgid(), additional_gids=os.getgroups(), guest_root=True))
        ask(2, start_process=agent_pb2.StartProcessRequest(exec_id="big"))
        # The host does not read for a while: the agent must stop reading the pipe, not drop.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            service.run_once(max_wait_s=0.01)
            most_queued = max(most_queued, service._queued_events)
        assert service._backlogged()
        assert most_queued < MAX_QUEUED_EVENTS
        deadline = time.monotonic() + 60
        while exit_status is None:
            assert time.monotonic() < deadline, f"received {received} of {total} bytes"
            service.run_once(max_wait_s=0.01)
            try:
                data = host_sock.recv(1 << 20)
            except BlockingIOError:
                continue
            for payload in decoder.feed(data):
                message = agent_pb2.GuestMessage.FromString(payload)
                if message.WhichOneof("kind") == "event":
                    kind = message.event.WhichOneof("kind")
                    if kind == "process_output":
                        received += len(message.event.process_output.data)
                    elif kind == "process_exited":
                        exit_status = message.event.process_exited.exit_status
        assert received == total and exit_status == 0
    finally:
        handler.processes.close()
        host_sock.close()
        guest_sock.close()


def _can(operation) -> bool:
    """Whether a privileged operation works here (Bazel's sandbox may drop capabilities)."""
    pid = os.fork()
    if pid == 0:
        try:
            operation()
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0


def _unshare() -> None:
    import ctypes

    if ctypes.CDLL(None, use_errno=True).unshare(0x00020000 | 0x20000000 | 0x04000000 | 0x08000000) != 0:
        raise OSError(ctypes.get_errno(), "unshare")


@pytest.mark.skipif(not os.path.exists("/bin/busybox"), reason="needs a static /bin/busybox")
def test_a_container_sees_only_its_busybox_rootfs(guest, tmp_path):
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "echo", "ls"):
        os.symlink("/bin/busybox", root / "bin" / applet)
    (root / "marker-only-here").write_text("")
    if not _can(_unshare):
        pytest.skip("namespaces are not permitted here (no CAP_SYS_ADMIN); tests/integration covers containers")
    created = guest.create("p1", ["sh", "-c", "ls /; echo done"], rootfs=str(root), env=["PATH=/bin"])
    if "mount -t proc" in created.error:
        pytest.skip("this sandbox's /proc is not fully visible, so a new one cannot be mounted here")
    if "mount -t (bind) none /:" in created.error:
        pytest.skip("this root is not a mount point (a chroot, as tools/fresh-machine-check.sh runs the "
                    "tests in), so the container's mounts cannot be made private; tests/integration covers them")
    assert created.error == ""
    guest.response(guest.send(start_process=agent_pb2.StartProcessRequest(exec_id="p1")))
    assert guest.exited("p1") == 0
    listing = guest.output("p1").split()
    assert b"marker-only-here" in listing and listing[-1] == b"done"


def test_a_container_refuses_the_guest_root_as_its_rootfs(guest):
    created = guest.create("p1", ["true"], guest_root=False)
    assert "rootfs '/' is the guest's root: a container needs its own rootfs" in created.error


def test_helper_errors_reach_create(guest, tmp_path):
    # A rootfs this unprivileged test cannot contain (or pivot into): the helper's reason comes
    # back as the CreateProcess error, and nothing is left running.
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/bin/true", root / "bin" / "true")
    if _can(_unshare):
        pytest.skip("namespaces are permitted here: the failure this test needs does not happen")
    created = guest.create("p1", ["true"], rootfs=str(root), env=["PATH=/bin"])
    assert "unshare the container's namespaces" in created.error


def test_other_user_and_groups(guest):
    if not _can(lambda: (os.setgroups([65534]), os.setresgid(65534, 65534, 65534), os.setresuid(65534, 65534, 65534))):
        pytest.skip("changing user ids is not permitted here")
    assert guest.run("p1", ["sh", "-c", "id -u; id -g; id -G"], uid=65534, gid=65534, additional_gids=[65533]) == 0
    assert guest.output("p1").split() == [b"65534", b"65534", b"65534", b"65533"]


# --- mounts ---------------------------------------------------------------------------------------------


def _mountinfo(guest, *lines):
    path = guest.fake.root.path("proc/self/mountinfo")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("22 1 0:21 / /proc rw,nosuid - proc proc rw\n")
        for line in lines:
            f.write(line + "\n")


def test_mount_shared_mounts_once(guest, tmp_path):
    point = str(tmp_path / "run" / "shared")
    _mountinfo(guest)
    reply = guest.response(guest.send(mount_shared=agent_pb2.MountSharedRequest(tag="kataShared", mount_point=point)))
    assert reply.error == "" and reply.WhichOneof("kind") == "mount_shared"
    assert guest.mounts == [("kataShared", point, "9p", 0, mounts.NINEP_OPTIONS)]
    assert os.path.isdir(point)
    _mountinfo(guest, f"40 22 0:40 / {point} rw,relatime - 9p kataShared rw,trans=virtio")
    again = guest.response(guest.send(mount_shared=agent_pb2.MountSharedRequest(tag="kataShared", mount_point=point)))
    assert again.error == "" and len(guest.mounts) == 1


def test_the_first_mount_of_the_share_answers_once_the_warm_up_container_is_done(tmp_path):
    """Whether the helper may make namespaces here or not, the warm-up container ends, is
    reaped without an event, and only then is MountShared answered; a second mount runs none."""
    guest = Guest(str(tmp_path / "guest"), warm_up=True)
    try:
        point = str(tmp_path / "run" / "shared")
        _mountinfo(guest)
        request_id = guest.send(mount_shared=agent_pb2.MountSharedRequest(tag="kataShared", mount_point=point))
        assert guest.messages == [] and len(guest.handler.processes._warm_ups) == 1
        reply = guest.response(request_id)
        assert reply.error == "" and reply.WhichOneof("kind") == "mount_shared"
        assert guest.handler.processes._warm_ups == [] and guest.handler.processes._procs == {}
        assert [m for m in guest.messages if m.WhichOneof("kind") == "event"] == []
        assert os.path.isdir(guest.fake.root.path(WARM_UP_ROOTFS.lstrip("/")))  # in the guest's root, not the host's
        _mountinfo(guest, f"40 22 0:40 / {point} rw,relatime - 9p kataShared rw,trans=virtio")
        again = guest.send(mount_shared=agent_pb2.MountSharedRequest(tag="kataShared", mount_point=point))
        assert guest.response(again).error == "" and guest.handler.processes._warm_ups == []
    finally:
        guest.close()


def test_mount_shared_refuses_a_point_taken_by_something_else(guest):
    _mountinfo(guest, "40 22 0:40 / /run/x rw - tmpfs tmpfs rw")
    reply = guest.response(guest.send(
        mount_shared=agent_pb2.MountSharedRequest(tag="kataShared", mount_point="/run/x")))
    assert "/run/x already has a tmpfs mount of 'tmpfs'" in reply.error and guest.mounts == []


@pytest.mark.parametrize("tag,point,message", [
    ("", "/mnt", "tag '' is not a 9p mount tag"),
    ("a b", "/mnt", "tag 'a b'"),
    ("kataShared", "mnt", "mount_point 'mnt' is not an absolute path"),
])
def test_mount_shared_validates(guest, tag, point, message):
    _mountinfo(guest)
    reply = guest.response(guest.send(mount_shared=agent_pb2.MountSharedRequest(tag=tag, mount_point=point)))
    assert message in reply.error


def test_mount_errors_name_the_share(guest, tmp_path):
    def refuse(*args):
        raise OSError(2, "No such file or directory", args[1])

    _mountinfo(guest)
    handler = AgentHandler(guest.fake.root, mount=refuse)
    request = agent_pb2.Request(id=1,
                                mount_shared=agent_pb2.MountSharedRequest(tag="nope", mount_point=str(tmp_path / "m")))
    [message] = handler.handle_frame(request.SerializeToString())
    assert "mount -t 9p" in message.response.error and "mount_tag=nope" in message.response.error


def test_readonly_refuses_the_guest_root(guest):
    _mountinfo(guest)
    assert "rootfs other than the guest's /" in guest.create("p1", ["true"], rootfs_readonly=True).error


def test_mountinfo_unescapes_paths(tmp_path):
    path = tmp_path / "mountinfo"
    path.write_text("40 22 0:40 / /run/with\\040space rw shared:1 - 9p my\\134tag rw\n")
    [entry] = mounts.read_mountinfo(str(path))
    assert entry == mounts.MountEntry("/run/with space", "9p", "my\\tag", ["rw"])

