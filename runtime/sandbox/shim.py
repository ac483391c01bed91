"""The per-container shim: creates the sandbox VM and container, then owns them.

`kata-runtime create` starts it detached (own session), with the caller's
stdin, stdout and stderr, which are the container's stdio, as runc's container
process would have them. It reports "created" or the error on a status pipe, then
serves start, kill, exec, wait, ps and delete on its control socket. Its own log
goes to shim.log in the container's state directory, never to the
container's stdio.

The shim is the container's host process, as runc's init process is: its pid is
the one `create --pid-file` writes and `state` prints, it lives while the
container's process runs, and it exits with that process's exit status once the
last output is written and the VM is gone, so that a container engine's shim,
as subreaper, reaps it as it would reap runc's container process.

Every process's output comes over the one agent connection and is written to
its reader before the next event is read: a reader that stalls holds up the
other processes' output and the agent's replies until it reads again (bounded
memory, nothing lost); a reader that goes away gives its process SIGPIPE.

A process with process.terminal has a pty in the guest; the engine gets the
master of a host pty over its --console-socket (runtime/sandbox/terminal.py),
the process's output goes to that pty, what the engine types there goes to the
process, and so do window-size changes.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import select
import signal
import socket
import time
from typing import Any, Callable

from opentelemetry.context import Context

from configuration.loader import RuntimeConfig
from factory import ownership, sharedfs, tracing
from factory.config import VMConfig
from factory.errors import AgentError
from factory.ownership import OwnerKind
from factory.vm import VM
from hostos import process as host_process
from hostos import sockets
from runtime.oci.spec import BundleSpec, ProcessSpec, SpecPolicy, load_bundle, parse_process
from runtime.sandbox import control, hostside, stdin_relay, vm_source
from runtime.sandbox.state import ContainerError, ContainerState, StateStore, Status, now_rfc3339
from runtime.sandbox.terminal import HostConsole
from runtime.warm.anchor import Anchor

# ProcessOutput stream numbers (agent.proto).
STDOUT, STDERR = 1, 2
# QEMU closes the agent socket as it exits; this long for the process to be gone tells a dead
# VM from a live one whose agent went away.
QEMU_EXIT_GRACE_S = 2.0
# A command sends its request as soon as it connects; one that does not in this long is stuck.
REQUEST_READ_TIMEOUT_S = 30.0
# Commands on one container are few and short-lived; waits and execs hold a connection each.
LISTEN_BACKLOG = 64
# An exec dies with its container's PID namespace when the container's process exits; the guest
# reports those exits right after it. This long is ample for them before the VM goes.
EXEC_EXIT_GRACE_S = 5.0
# What a process that did not exit by itself reports: killed, as by SIGKILL (128 + 9).
KILLED_STATUS = 128 + signal.SIGKILL
# After the container has stopped, replies in flight (exit statuses) get this long to be sent.
REPLY_FLUSH_S = 5.0

_TRACER = "kata_vmfactory.runtime"
log = logging.getLogger("kata-shim")


def sized_request(base: VMConfig, spec: BundleSpec) -> VMConfig:
    """The base VM config with the spec's CPU and memory asks (0 leaves the base size)."""
    hv = dataclasses.replace(base.hypervisor, num_vcpus=spec.vcpus or base.hypervisor.num_vcpus,
                             memory_mib=max(spec.memory_mib, base.hypervisor.memory_mib))
    return dataclasses.replace(base, hypervisor=hv)


class Shim:
    def __init__(self, store: StateStore, config: RuntimeConfig, container_id: str, bundle: str,
                 console_socket: str = "", anchor: Anchor | None = None) -> None:
        self.store = store
        self.config = config
        self.id = container_id
        self.bundle = bundle
        self.state = ContainerState(id=container_id, bundle=bundle, status=Status.CREATING, created=now_rfc3339(),
                                    shim_pid=os.getpid(),
                                    shim_start_time=host_process.start_time(os.getpid()) or 0,
                                    vm_run_root=config.vm_run_root,
                                    anchor_pid=anchor.pid if anchor else 0,
                                    anchor_start_time=anchor.start_time if anchor else 0)
        self.anchor = anchor
        self.vm: VM | None = None
        self.exited = asyncio.Event()
        # exec id -> stream number -> fd its output goes to; the container's own go to our stdio.
        self.outputs: dict[str, dict[int, int]] = {container_id: {STDOUT: 1, STDERR: 2}}
        self.exec_exits: dict[str, asyncio.Future] = {}
        self.tasks: set[asyncio.Task] = set()
        self.stopping = False  # our teardown: the agent connection closing then is no news
        self.done = asyncio.Event()
        # The container's stdin (the shim's own fd 0), relayed to its process; None: /dev/null.
        self.stdin_fd: int | None = 0 if stdin_relay.is_readable_stdin(0) else None
        # exec id -> the host pid holding its control connection (`ps` lists them).
        self.exec_holders: dict[str, int] = {}
        self._teardown: asyncio.Task | None = None
        self._finishing: asyncio.Task | None = None
        self.host: hostside.HostSide | None = None  # netns, hooks, host mounts (engines' side)
        self.guest_mounts: list[dict[str, Any]] = []  # the spec's mounts, host binds as shared
        # The engine's socket for the container's terminal (create --console-socket).
        self.console_socket = console_socket
        # exec id -> the host end of its terminal, and the task relaying input and sizes to it.
        self.consoles: dict[str, HostConsole] = {}
        self.console_relays: dict[str, asyncio.Task] = {}

    # ---- create -------------------------------------------------------------

    async def create(self, ctx: Context | None) -> None:
        phases: dict[str, float] = {}
        began = time.time()  # wall clock: the benchmark places create within the whole command
        started = time.monotonic()

        def phase(name: str) -> None:
            nonlocal started
            now = time.monotonic()
            phases[name] = round((now - started) * 1000, 1)
            started = now

        spec = load_bundle(self.bundle, SpecPolicy(disable_guest_seccomp=self.config.disable_guest_seccomp))
        self._check_terminal(spec.process, self.console_socket)  # before any VM exists
        self.state.annotations = dict(spec.annotations)
        self.state.rootfs = spec.rootfs
        self.store.save(self.state)
        # ENGINE WIRING (create, 1/2): the shim's network namespace, then the create-time hooks,
        # before anything is shared (a hook may write the files the container binds).
        self.host = hostside.HostSide(spec, self.id)
        self.host.enter_network_namespace()
        for stage in ("prestart", "createRuntime", "createContainer"):
            await self.host.run_hooks(stage, "creating", fatal=True)
        if spec.process.terminal:
            self.stdin_fd = None  # its input comes through the terminal
            await self._open_console(self.id, self.console_socket)
        # The VM is this shim's from its first moment: if the shim dies, gc reaps it.
        ownership.act_as(OwnerKind.CONTAINER, self.id)
        factory, path, warnings = await vm_source.open_factory(self.config, ctx)
        for warning in warnings:
            log.warning("%s", warning)
        phase("factory")
        try:
            self.vm = await factory.get_vm(sized_request(self.config.vm_config, spec), ctx)
        finally:
            if path in ("vmcache", "direct"):
                await factory.close()  # a template stays for the next sandbox
        phase("get_vm")
        self.state.vm = self.vm.record()
        self.store.save(self.state)
        rootfs_share = await self.vm.share_rootfs(self.id, spec.rootfs, spec.rootfs_readonly, ctx)
        self.state.share_mount, self.state.share_mount_id = rootfs_share.mount_point, rootfs_share.mount_id
        self.state.guest_rootfs = rootfs_share.guest_path
        self.store.save(self.state)
        phase("share_rootfs")  # the host bind and the guest's mount: not process creation
        # ENGINE WIRING (create, 2/2): host binds into the VM's share, each recorded as made.
        try:
            self.guest_mounts = self.host.share_mounts(self.vm.hypervisor.run, self.state.host_mounts)
        finally:
            self.store.save(self.state)
        pid = await self._create_process(self.id, spec.process, ctx, hostname=spec.hostname,
                                         readonly=spec.rootfs_readonly, open_stdin=self.stdin_fd is not None)
        await self._console_created(self.id)
        phase("create_process")
        self.state.guest_pid = pid
        self.state.status = Status.CREATED
        self.state.annotations.update({
            "io.katacontainers.factory.path": path,
            "io.katacontainers.factory.warnings": "; ".join(warnings),
            "io.katacontainers.vm.id": self.vm.id,
            "io.katacontainers.timing.ms": json.dumps(phases),
            "io.katacontainers.timing.unix": json.dumps({"began": round(began, 6), "created": round(time.time(), 6)}),
        })
        self.store.save(self.state)

    async def _create_process(self, exec_id: str, process: ProcessSpec, ctx: Context | None,
                              hostname: str = "", readonly: bool = False, open_stdin: bool = False) -> int:
        # The container's own limits bound its execs too; an exec joins the container's namespaces.
        spec = load_bundle(self.bundle)
        limits = process if exec_id == self.id else spec.process
        return await self.vm.agent.create_process(
            exec_id=exec_id, args=process.args, env=process.env, cwd=process.cwd, uid=process.uid,
            gid=process.gid, additional_gids=process.additional_gids,
            rootfs=self.state.guest_rootfs, rootfs_readonly=readonly, hostname=hostname, open_stdin=open_stdin,
            container_exec_id="" if exec_id == self.id else self.id, capabilities=limits.capabilities,
            rlimits=limits.rlimits, no_new_privileges=limits.no_new_privileges, mounts=self.guest_mounts,
            readonly_paths=spec.readonly_paths, masked_paths=spec.masked_paths, sysctls=spec.sysctls,
            terminal=process.terminal, ctx=ctx)

    # ---- serving ------------------------------------------------------------

    async def relay_events(self) -> None:
        """Guest events: each process's output to its fds, in order, each write finished before
        the next event is read (that wait is the backpressure: the agent client's queue fills,
        then the guest agent stops reading the process's pipes); exits to their waiters."""
        while True:
            try:
                event = await self.vm.agent.next_event()
            except AgentError as err:
                await self._vm_lost(f"lost the guest agent: {err}")
                return
            kind = event.WhichOneof("kind")
            if kind == "process_output":
                out = event.process_output
                await self._write_output(out.exec_id, out.stream, out.data)
            elif kind == "process_exited":
                exited = event.process_exited
                await self._console_done(exited.exec_id)  # after its last output, written above
                if exited.exec_id == self.id:
                    self.state.status = Status.STOPPED
                    self.state.exit_status = exited.exit_status
                    self.store.save(self.state)
                    self.exited.set()
                    self.finish()
                else:
                    waiter = self.exec_exits.get(exited.exec_id)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(exited.exit_status)

    async def _write_output(self, exec_id: str, stream: int, data: bytes) -> None:
        fds = self.outputs.get(exec_id)
        fd = fds.get(stream) if fds else None
        if fd is None:
            return  # a stream whose reader went away (see below): the process was told with SIGPIPE
        try:
            await asyncio.to_thread(_write_all, fd, data)
        except OSError as err:
            # As for a process writing to a pipe nobody reads any more: SIGPIPE. What it writes
            # from now on to that stream is discarded, so it can never block the other processes.
            name = "stdout" if stream == STDOUT else "stderr"
            log.warning("writing %s's %s failed (%s): discarding its %s and sending it SIGPIPE",
                        exec_id, name, err.strerror or err, name)
            fds.pop(stream, None)
            self._spawn(self._signal_quietly(exec_id, signal.SIGPIPE), f"sigpipe-{exec_id}")

    async def _signal_quietly(self, exec_id: str, signum: int) -> None:
        try:
            await self.vm.agent.signal_process(exec_id, signum)
        except AgentError as err:
            log.info("signalling %s: %s", exec_id, err)  # it may have exited meanwhile

    async def _vm_lost(self, why: str) -> None:
        """The VM died or its agent went away: the container is stopped and everyone waiting is told."""
        if self.stopping:
            return  # our own teardown closed the connection
        gone = await self.vm.wait_exited(QEMU_EXIT_GRACE_S)
        self._stopped(f"its VM exited ({why})" if gone else f"its VM stopped answering ({why})")

    def _stopped(self, reason: str) -> None:
        """The container can no longer be served: it is stopped, and everyone waiting is told why."""
        log.error("container %s: %s", self.id, reason)
        if self.state.status != Status.STOPPED:  # else its process had exited already: that status stands
            self.state.status = Status.STOPPED
            self.state.reason = reason
            self.store.save(self.state)
            self.exited.set()
        for waiter in self.exec_exits.values():
            if not waiter.done():
                waiter.set_exception(ContainerError(f"container {self.id} stopped: {reason}"))
        self.finish()

    async def _serve_connection(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        fds: list[int] = []
        decoder = control.FrameDecoder()

        async def send(message: dict[str, Any]) -> None:
            await loop.sock_sendall(sock, control.encode(message))

        try:
            request, fds = await asyncio.wait_for(control.receive_request(sock, decoder), REQUEST_READ_TIMEOUT_S)
            if request.get("op") == "exec":
                await self._exec(request, fds, send, control.ExecChannel(sock, decoder))
            else:
                await self._handle(request, fds, send)
        except Exception as err:  # every failure goes back to the command that asked
            log.warning("request failed: %s", err)
            try:
                await send({"error": str(err) or type(err).__name__})
            except OSError:
                pass
        finally:
            for fd in fds:
                os.close(fd)
            sock.close()

    async def _handle(self, request: dict[str, Any], fds: list[int], send) -> None:
        op = request.get("op")
        if op == "start":
            if self.state.status != Status.CREATED:
                raise ContainerError(f"container {self.id} is {self.state.status}, not created")
            # ctr sets the terminal's size between create and start: pass it on now rather than
            # at the next poll, so the program starts with it (runc's terminal has it then too).
            await self._console_created(self.id)
            await self.vm.agent.start_process(self.id)
            self.state.status = Status.RUNNING
            self.store.save(self.state)
            if self.host is not None:  # ENGINE WIRING (start): poststart hooks, failures warned
                await self.host.run_hooks("poststart", "running", fatal=False)
            await send({"ok": True})
        elif op == "kill":
            await self._kill(int(request.get("signal", signal.SIGTERM)), bool(request.get("all")))
            await send({"ok": True})
        elif op == "ps":
            await send({"ok": True, "pids": [self.state.pid or os.getpid(), *self.exec_holders.values()]})
        elif op in ("pause", "resume"):
            await self._pause_or_resume(op)
            await send({"ok": True})
        elif op == "wait":
            await send({"ok": True})
            await self.exited.wait()
            if self.state.exit_status is None:
                raise ContainerError(f"container {self.id} stopped: {self.state.reason}")
            await send({"exit_status": self.state.exit_status})
        elif op == "delete":
            # Of a container never started, or stopped and on its way out: either way the shim goes.
            self.state.reason = self.state.reason or "deleted"
            await asyncio.shield(self.finish())
            await send({"ok": True})
        else:
            raise ContainerError(f"unknown shim request {op!r}")

    async def _exec(self, request: dict[str, Any], fds: list[int], send, channel: control.ExecChannel) -> None:
        """An exec lives as long as its control connection: the caller (a foreground `exec`, or
        the detached holder whose pid a container engine kills) forwards signals on it, and its
        closing before the process has exited kills the process, as SIGKILL of runc's exec would."""
        if self.state.status != Status.RUNNING:
            why = f" ({self.state.reason})" if self.state.reason else ""
            raise ContainerError(f"container {self.id} is {self.state.status}{why}; exec needs a running container")
        if len(fds) != 3:
            raise ContainerError(f"exec needs the caller's stdin, stdout and stderr attached, got {len(fds)} fds")
        exec_id = str(request["exec_id"])
        process = parse_process(request["process"], "exec")
        console_socket = str(request.get("console_socket") or "")
        self._check_terminal(process, console_socket)
        # A terminal's input and output go through the engine's pty, not the caller's stdio.
        stdin = fds[0] if not process.terminal and stdin_relay.is_readable_stdin(fds[0]) else None
        exit_status = asyncio.get_running_loop().create_future()
        self.exec_exits[exec_id] = exit_status
        if process.terminal:
            # Unused, and the engine may wait for the end of those pipes (go-runc does).
            for fd in fds:
                os.close(fd)
            fds.clear()
        else:
            self.outputs[exec_id] = {STDOUT: fds[1], STDERR: fds[2]}
        watch = relay = None
        try:
            if process.terminal:
                await self._open_console(exec_id, console_socket)
            await self._create_process(exec_id, process, None, open_stdin=stdin is not None)
            await self._console_created(exec_id)
            self._relay_console(exec_id)
            await self.vm.agent.start_process(exec_id)
            self.exec_holders[exec_id] = channel.peer_pid()
            await send({"ok": True})
            watch = self._spawn(self._watch_exec(exec_id, channel, exit_status), f"watch-{exec_id}")
            if stdin is not None:
                relay = self._spawn(stdin_relay.relay(self.vm.agent, exec_id, stdin), f"stdin-{exec_id}")
            # Set after the relay wrote the process's last output (the guest sends it first).
            await send({"exit_status": await exit_status})
        finally:
            for task in (watch, relay):
                if task is not None:
                    task.cancel()
            self.exec_exits.pop(exec_id, None)
            self.outputs.pop(exec_id, None)
            self.exec_holders.pop(exec_id, None)
            await self._console_done(exec_id)

    async def _watch_exec(self, exec_id: str, channel: control.ExecChannel, exit_status: asyncio.Future) -> None:
        async for message in channel.messages():
            if message.get("op") == "signal":
                await self._signal_quietly(exec_id, int(message.get("signal", signal.SIGTERM)))
        if not exit_status.done():
            log.info("exec %s: its caller went away; killing it", exec_id)
            await self._signal_quietly(exec_id, signal.SIGKILL)

    # ---- runc's kill, pause and resume; the end of the container ---------------

    async def _kill(self, signum: int, every_process: bool) -> None:
        if self.state.status in (Status.STOPPED, Status.CREATING):
            if every_process:
                return  # nothing left to signal, as runc's kill --all of a stopped container
            raise ContainerError(f"container {self.id}: container not running")
        if self.state.status == Status.PAUSED:
            await self._pause_or_resume("resume")  # a frozen guest cannot take the signal
        await self.vm.agent.signal_process(self.id, signum)
        if every_process:
            for exec_id in list(self.exec_holders):
                await self._signal_quietly(exec_id, signum)

    async def _pause_or_resume(self, op: str) -> None:
        want, then = (Status.RUNNING, Status.PAUSED) if op == "pause" else (Status.PAUSED, Status.RUNNING)
        if self.state.status != want:
            raise ContainerError(f"container {self.id} is {self.state.status}, not {want}: cannot {op} it")
        if op == "pause":
            await self.vm.hypervisor.pause()
        else:
            await self.vm.hypervisor.resume()
        self.state.status = then
        self.store.save(self.state)

    def finish(self) -> asyncio.Task:
        """The container has stopped: tear down and let the shim exit (once, in the background)."""
        if self._finishing is None:
            self._finishing = self._spawn(self._finish(), "finish")
        return self._finishing

    async def _finish(self) -> None:
        if self.exec_exits:
            pending = [w for w in self.exec_exits.values() if not w.done()]
            if pending:
                await asyncio.wait(pending, timeout=EXEC_EXIT_GRACE_S)
            for waiter in self.exec_exits.values():
                if not waiter.done():
                    waiter.set_result(KILLED_STATUS)
        await self.teardown()
        if self.state.status != Status.STOPPED:  # deleted before it ran: killed, as runc's delete does
            self.state.status = Status.STOPPED
            self.exited.set()
        self.state.vm, self.state.share_mount, self.state.share_mount_id = {}, "", 0  # nothing left to stop
        self.store.save(self.state)
        self.done.set()

    def exit_status(self) -> int:
        """The shim's own exit status: its container process's."""
        return KILLED_STATUS if self.state.exit_status is None else self.state.exit_status

    # ---- terminals ----------------------------------------------------------

    @staticmethod
    def _check_terminal(process: ProcessSpec, console_socket: str) -> None:
        """runc's rule: a terminal needs a console socket to send it to, and only a terminal uses one."""
        if process.terminal and not console_socket:
            raise ContainerError("process.terminal is true but no --console-socket was given: pass the engine's "
                                 "socket for the terminal, or set process.terminal to false")
        if console_socket and not process.terminal:
            raise ContainerError(f"--console-socket {console_socket} was given but process.terminal is false: "
                                 "set process.terminal to true, or leave the console socket out")

    async def _open_console(self, exec_id: str, console_socket: str) -> None:
        """The host pty whose master goes to the engine now; the process's output goes to its slave."""
        console = await asyncio.to_thread(HostConsole.open, console_socket)  # a slow engine stalls no one else
        self.consoles[exec_id] = console
        self.outputs[exec_id] = {STDOUT: console.fd}

    async def _console_created(self, exec_id: str) -> None:
        """The window size the engine set already, before the process starts (runc does the same)."""
        console = self.consoles.get(exec_id)
        size = console.size_change() if console is not None else None
        if size is not None:
            await self.vm.agent.resize_console(exec_id, *size)

    def _relay_console(self, exec_id: str) -> None:
        """Input and window sizes from the engine's pty to the process's, while it runs."""
        console = self.consoles.get(exec_id)
        if console is not None:
            self.console_relays[exec_id] = self._spawn(self._relay_until_hangup(exec_id, console),
                                                       f"console-{exec_id}")

    async def _relay_until_hangup(self, exec_id: str, console: HostConsole) -> None:
        assert self.vm is not None, "consoles are relayed once the process exists"
        agent = self.vm.agent
        sizes = asyncio.ensure_future(console.watch_size(lambda rows, cols: agent.resize_console(exec_id, rows, cols)))
        try:
            await console.relay_input(lambda data: agent.write_stdin(exec_id, data))
            # The engine closed its master: as when a terminal hangs up, the process gets SIGHUP.
            log.info("the engine closed the terminal of %s: sending it SIGHUP", exec_id)
            await agent.signal_process(exec_id, signal.SIGHUP)
        except AgentError as err:
            log.info("terminal of %s: %s", exec_id, err)  # it exited meanwhile
        finally:
            sizes.cancel()
            await asyncio.gather(sizes, return_exceptions=True)

    async def _console_done(self, exec_id: str) -> None:
        """The process exited (its output is written): the engine reads the end of its terminal."""
        relay = self.console_relays.pop(exec_id, None)
        if relay is not None:
            relay.cancel()
            await asyncio.gather(relay, return_exceptions=True)
        console = self.consoles.pop(exec_id, None)
        if console is not None:
            self.outputs.pop(exec_id, None)
            console.close()

    async def teardown(self) -> None:
        """Stops the VM, removes the rootfs bind mount and the VM's run directory (once; callers
        that come later wait for the first)."""
        if self._teardown is None:
            self._teardown = asyncio.ensure_future(self._teardown_once())
        await asyncio.shield(self._teardown)

    async def _teardown_once(self) -> None:
        self.stopping = True
        for exec_id in list(self.consoles):
            await self._console_done(exec_id)
        sharedfs.unbind(self.state.share_mount, self.state.share_mount_id)
        hostside.unbind_all(self.state.host_mounts)  # ENGINE WIRING (teardown 1/2)
        # Gone: a later cleanup from the saved state must not unmount by IDs the kernel may since
        # have given to someone else's mounts (it would refuse, but warn).
        self.state.share_mount_id, self.state.host_mounts = 0, []
        try:
            self.store.save(self.state)
        except OSError as err:  # the state directory went first (delete --force): nothing to keep
            log.info("state not saved after unmounting: %s", err)
        if self.vm is not None:
            await self.vm.stop()
        if self.host is not None:  # ENGINE WIRING (teardown 2/2): poststop, as runc's destroy
            host, self.host = self.host, None  # once, whichever of delete or a signal came first
            await host.run_hooks("poststop", "stopped", fatal=False)

    async def serve(self, listening: Callable[[], None] = lambda: None) -> None:
        """Serves the control socket; `listening` runs once it accepts connections (create must
        not return before that, or an immediate start finds no socket)."""
        socket_path = str(self.store.shim_socket(self.id))
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sockets.bind(server, socket_path)  # an engine's state root may make the path long
        os.chmod(socket_path, 0o600)
        server.listen(LISTEN_BACKLOG)
        server.setblocking(False)
        listening()
        self._relay_console(self.id)
        self._spawn(self.relay_events(), "relay", critical=True)
        self._spawn(self._accept(server), "accept", critical=True)
        if self.stdin_fd is not None:
            self._spawn(stdin_relay.relay(self.vm.agent, self.id, self.stdin_fd), "stdin")
        loop = asyncio.get_running_loop()
        # A shim told to stop by a signal still cleans up (delete --force is the other way).
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: self._spawn(self._stop_by_signal(), "stop-by-signal"))
        if self.anchor:
            loop.add_reader(self.anchor.sock.fileno(), self._anchor_readable)
        try:
            await self.done.wait()
        finally:
            server.close()
            # Exit statuses just answered are still on their way to the commands waiting for them.
            replies = [t for t in self.tasks if t.get_name().startswith("request")]
            if replies:
                await asyncio.wait(replies, timeout=REPLY_FLUSH_S)
            tasks = list(self.tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, server: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(server)
            sock.setblocking(False)
            self._spawn(self._serve_connection(sock), "request")

    def _spawn(self, coro, name: str, critical: bool = False) -> asyncio.Task:
        """A task the shim owns: kept until done, its failure logged; a critical one's failure
        (the relay, the accept loop) stops the container rather than leave it half-served."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self.tasks.add(task)

        def finished(task: asyncio.Task) -> None:
            self.tasks.discard(task)
            if task.cancelled() or task.exception() is None:
                return
            err = task.exception()
            log.error("shim task %s failed: %s", name, err, exc_info=err)
            if critical and not self.stopping:
                self._stopped(f"the shim's {name} task failed: {err}")

        task.add_done_callback(finished)
        return task

    def _anchor_readable(self) -> None:
        """The anchor says nothing after its start: readable means it is gone (killed), and the
        container stops as runc's does when its process is killed."""
        try:
            if self.anchor.sock.recv(64, socket.MSG_DONTWAIT):
                return  # it has nothing to say; not its end
        except BlockingIOError:
            return
        except OSError:
            pass  # reset: gone as well
        asyncio.get_running_loop().remove_reader(self.anchor.sock.fileno())
        self.state.reason = self.state.reason or f"its host process (pid {self.anchor.pid}) was killed"
        self._spawn(self._stop_by_signal(), "stop-by-anchor")

    async def _stop_by_signal(self) -> None:
        self.state.reason = self.state.reason or "its shim was told to stop"
        await asyncio.shield(self.finish())


def _write_all(fd: int, data: bytes) -> None:
    """All of `data` to `fd`, blocking while the reader is slow (also if the fd is non-blocking)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [])


async def run_shim(store: StateStore, config: RuntimeConfig, container_id: str, bundle: str, status_fd: int,
                   lock_fd: int = -1, console_socket: str = "", anchor: Anchor | None = None) -> int:
    """Creates the container and serves it until it has stopped; returns its exit status. `lock_fd`,
    the container's lock shared with the create command, is held until create has succeeded or
    cleaned up, so a delete waits for that.
    `console_socket`: where the engine takes the container's terminal (process.terminal).
    `anchor`: the host process standing for this shim (run warm), whose pid create reports."""
    shim = Shim(store, config, container_id, bundle, console_socket=console_socket, anchor=anchor)

    def report(message: dict[str, Any]) -> None:
        _report(status_fd, message)
        if lock_fd >= 0:
            os.close(lock_fd)

    with tracing.span(_TRACER, "CreateContainer", None, container_id=container_id) as ctx:
        try:
            await shim.create(ctx)
        except BaseException as err:
            log.error("create failed: %s", err)
            await shim.teardown()
            report({"error": str(err)})
            return 1
    await shim.serve(listening=lambda: report({"ok": True, "pid": anchor.pid if anchor else os.getpid()}))
    return shim.exit_status()


def _report(fd: int, message: dict[str, Any]) -> None:
    try:
        os.write(fd, (json.dumps(message) + "\n").encode())
        os.close(fd)
    except OSError:
        pass
