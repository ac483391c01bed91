"""Terminals in real VMs: process.terminal gives a container process a pty in the guest (its own
devpts, so `tty` names it), and kata-runtime hands the engine a pty master over --console-socket
through which one types into that process, reads its output and resizes it.
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import os
import select
import socket
import struct
import subprocess
import tempfile
import termios
import time
from pathlib import Path

import pytest

from factory.vm import VM
from runtime.sandbox import control
from tests.integration.bundles import make_bundle
from tests.integration.vmtest import GUEST_SHARED, SHARED_TAG, base_config, share_rootfs, write_config

RUNTIME = os.path.abspath("runtime/kata-runtime")
# Everything waited for here is bounded; a TCG guest on a loaded 2-core machine is slow.
DEADLINE_S = 120.0
# Busybox applets these tests run beyond the shared bundle's.
TERMINAL_APPLETS = ("tty", "stty", "stat")
PROMPT = b"prompt> "


def _with_terminal_applets(rootfs: Path) -> None:
    for applet in TERMINAL_APPLETS:
        os.symlink("/bin/busybox", rootfs / "bin" / applet)


def _process(exec_id: str, args: list[str], rootfs: str, **overrides) -> dict:
    fields = dict(exec_id=exec_id, args=args, env=["PATH=/bin", "HOME=/", "PS1=prompt> "], cwd="/", uid=0, gid=0,
                  additional_gids=[], rootfs=rootfs, terminal=True)
    fields.update(overrides)
    return fields


class GuestOutput:
    """Each process's terminal output as the agent sends it, and its exit status."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.out: dict[str, bytes] = {}
        self.exits: dict[str, int] = {}

    async def _next(self) -> None:
        event = await asyncio.wait_for(self.vm.agent.next_event(), DEADLINE_S)
        kind = event.WhichOneof("kind")
        if kind == "process_output":
            assert event.process_output.stream == 1, "a terminal has one output stream"
            self.out[event.process_output.exec_id] = self.out.get(event.process_output.exec_id, b"") + \
                event.process_output.data
        elif kind == "process_exited":
            self.exits[event.process_exited.exec_id] = event.process_exited.exit_status

    async def until(self, exec_id: str, needle: bytes) -> bytes:
        while needle not in self.out.get(exec_id, b""):
            await self._next()
        return self.out[exec_id]

    async def exit_status(self, exec_id: str) -> int:
        while exec_id not in self.exits:
            await self._next()
        return self.exits[exec_id]


def test_a_container_and_an_exec_get_their_own_ptys(run_root):
    async def body():
        vm = await VM.new(base_config(), run_root)
        try:
            await vm.agent.mount_shared(SHARED_TAG, GUEST_SHARED)
            host_rootfs, rootfs = share_rootfs(vm, "c1")
            _with_terminal_applets(host_rootfs)
            output = GuestOutput(vm)

            await vm.agent.create_process(**_process("c1", ["sh"], rootfs))
            await vm.agent.resize_console("c1", 33, 101)  # before start, as the shim does
            await vm.agent.start_process("c1")
            await output.until("c1", PROMPT)
            await vm.agent.write_stdin("c1", b"tty; stty size; echo via-console >/dev/console\n")
            shown = await output.until("c1", b"via-console\r\n")
            # The container's own pts, the size set, and /dev/console is the terminal too (as runc).
            assert b"\r\n/dev/pts/0\r\n33 101\r\nvia-console\r\n" in shown

            # An exec joins the container and gets the next pty of the container's devpts.
            await vm.agent.create_process(**_process("e1", ["sh", "-c", "tty; stty size; read line; stty size"],
                                                     rootfs, container_exec_id="c1"))
            await vm.agent.resize_console("e1", 20, 70)
            await vm.agent.start_process("e1")
            assert await output.until("e1", b"20 70\r\n") == b"/dev/pts/1\r\n20 70\r\n"
            await vm.agent.resize_console("e1", 44, 120)  # after start: seen by the next stty
            await vm.agent.write_stdin("e1", b"\n")
            assert await output.exit_status("e1") == 0
            assert output.out["e1"].endswith(b"\r\n44 120\r\n")

            # Another user's terminal is that user's (as runc's fixStdioPermissions; the group stays tty).
            await vm.agent.create_process(**_process("u1", ["sh", "-c", "stat -c %u:%g $(tty); echo ok >/dev/tty"],
                                                     rootfs, container_exec_id="c1", uid=1000, gid=1000))
            await vm.agent.start_process("u1")
            assert await output.exit_status("u1") == 0
            assert output.out["u1"] == b"1000:5\r\nok\r\n"

            await vm.agent.write_stdin("c1", b"echo hi; exit 3\n")
            assert await output.exit_status("c1") == 3
            assert output.out["c1"].endswith(b"\r\nhi\r\n")
        finally:
            await vm.stop()
    asyncio.run(body())


class Engine:
    """What containerd's runc shim does with --console-socket: listen, take the master, use it."""

    def __init__(self, directory: str, name: str = "console.sock") -> None:
        self.path = os.path.join(directory, name)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.settimeout(DEADLINE_S)
        self.master = -1
        self.seen = b""

    def receive(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            payload, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        assert payload == b"/dev/ptmx" and len(fds) == 1, (payload, fds)
        self.master = fds[0]

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def read_until(self, needle: bytes) -> bytes:
        """Output so far once `needle` has appeared after what earlier calls consumed."""
        deadline = time.monotonic() + DEADLINE_S
        while needle not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{needle!r} never came from the terminal; got {self.seen!r}"
            if select.select([self.master], [], [], left)[0]:
                chunk = os.read(self.master, 4096)
                assert chunk, f"the terminal ended before {needle!r}; got {self.seen!r}"
                self.seen += chunk
        shown, _, self.seen = self.seen.partition(needle)
        return shown + needle

    def read_to_end(self) -> bytes:
        """The rest of the output, up to the hang-up the shim makes by closing its end."""
        deadline = time.monotonic() + DEADLINE_S
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"the terminal was never closed; got {self.seen!r}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: no slave is open any more
                    chunk = b""
                if not chunk:
                    rest, self.seen = self.seen, b""
                    return rest
                self.seen += chunk

    def close(self) -> None:
        self.listener.close()
        os.unlink(self.path)
        if self.master >= 0:
            os.close(self.master)


def test_kata_runtime_hands_the_terminal_to_the_console_socket(run_root):
    state_root = os.path.join(run_root, "state")
    base = [RUNTIME, "--root", state_root, "--config", write_config(run_root, template=False, cache=0)]
    bundle = make_bundle(os.path.join(run_root, "bundle"), ["sh"])
    _with_terminal_applets(Path(bundle, "rootfs"))
    config = json.loads(Path(bundle, "config.json").read_text())
    config["process"].update(terminal=True, env=["PATH=/bin", "HOME=/", "PS1=prompt> "])
    Path(bundle, "config.json").write_text(json.dumps(config))
    engine = Engine(run_root)

    def kata(*args: str) -> subprocess.CompletedProcess:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # files: a shim keeps them open
            code = subprocess.run(base + list(args), stdout=out, stderr=err, timeout=DEADLINE_S).returncode
            err.seek(0)
            return subprocess.CompletedProcess(args, code, b"", err.read().decode())

    try:
        refused = kata("create", "no-console", "--bundle", bundle)
        assert refused.returncode == 1
        assert "process.terminal is true but no --console-socket was given" in refused.stderr

        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # files: the shim keeps them
            create = subprocess.Popen(base + ["create", "c1", "--bundle", bundle, "--console-socket", engine.path],
                                      stdout=out, stderr=err)
            try:
                engine.receive()  # during create, as runc sends it
                engine.resize(30, 90)  # before the process exists: passed on before it starts
                create.wait(timeout=DEADLINE_S)
            finally:
                if create.poll() is None:
                    create.kill()
                    create.wait()
            err.seek(0)
            assert create.returncode == 0, err.read().decode()
        assert kata("start", "c1").returncode == 0

        engine.read_until(PROMPT)
        engine.type(b"tty; stty size\n")
        assert b"\r\n/dev/pts/0\r\n30 90\r\n" in engine.read_until(PROMPT)

        # A resize while it runs: the shim polls the size, so ask until the new one shows.
        engine.resize(45, 100)
        deadline = time.monotonic() + DEADLINE_S
        while True:
            engine.type(b"stty size\n")
            if b"45 100" in engine.read_until(PROMPT):
                break
            assert time.monotonic() < deadline, "the resize never reached the guest"

        # An exec with a terminal of its own: the shim's exec request names its console socket.
        exec_engine = Engine(run_root, "exec-console.sock")
        try:
            request = {"op": "exec", "exec_id": "e1", "console_socket": exec_engine.path,
                       "process": {"args": ["sh", "-c", "tty; read line; echo got $line"], "env": ["PATH=/bin"],
                                   "cwd": "/", "terminal": True}}
            shim_socket = os.path.join(state_root, "c1", "shim.sock")
            # Every exec attaches the caller's three stdio fds; a terminal's are left unused.
            null = os.open(os.devnull, os.O_RDWR)
            try:
                conn = control.request(shim_socket, request, fds=[null, null, null], timeout_s=DEADLINE_S)
            finally:
                os.close(null)
            with conn:
                exec_engine.receive()
                assert conn.read_reply() == {"ok": True}
                exec_engine.read_until(b"/dev/pts/1\r\n")
                exec_engine.type(b"typed\n")
                assert exec_engine.read_to_end().endswith(b"got typed\r\n")
                assert conn.read_reply() == {"exit_status": 0}
        finally:
            exec_engine.close()

        engine.type(b"echo hi; exit 3\n")
        assert engine.read_to_end().endswith(b"\r\nhi\r\n")
        assert kata("wait", "c1").returncode == 3
    finally:
        engine.close()
        for container_id in ("c1", "no-console"):
            subprocess.run(base + ["delete", "--force", container_id], capture_output=True, timeout=DEADLINE_S)


@pytest.fixture(autouse=True)
def _no_leftover_ptys():
    """Every pty the test's side opened is closed by its end (the shim's are checked by run_root)."""
    before = set(os.listdir("/proc/self/fd"))
    yield
    leaked = [fd for fd in set(os.listdir("/proc/self/fd")) - before
              if os.path.exists(f"/proc/self/fd/{fd}") and os.readlink(f"/proc/self/fd/{fd}").startswith("/dev/pts")]
    assert not leaked, f"ptys left open: {leaked}"
