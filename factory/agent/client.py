"""AgentClient: requests to the guest agent over the VM's virtio-serial socket.

QEMU serves the socket (server=on), so the host may connect at any time and
reconnect after another process let go; requests are matched to responses by
id by one reader task, and guest events go to a queue.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, Mapping, Sequence, cast

from opentelemetry.context import Context

from factory import tracing
from factory.errors import AgentError, AgentTimeoutError, AgentUnsupportedError
from protocols.agent import agent_pb2, framing

# Guest work under TCG is slow (a request takes a few ms, hot-plug onlining
# ~100 ms); 30 s means the guest is gone or wedged.
REQUEST_TIMEOUT_S = 30.0
CONNECT_RETRY_S = 0.005
# Events waiting for their reader. Process output and exits wait for room (the read loop stops
# reading the socket, QEMU stops taking the guest's writes, the agent stops reading the process's
# pipes, the process blocks): nothing is dropped and memory stays bounded. 256 output chunks of at
# most 64 KiB keep at most 16 MiB here while the reader catches up.
MAX_QUEUED_EVENTS = 256
# Informational events (agent started, CPUs onlined) that nobody reads are dropped once the queue
# is full, so a VM whose owner never reads events (a cached VM) cannot block its own replies.
_PROCESS_EVENTS = frozenset({"process_output", "process_exited"})

_TRACER = "kata_vmfactory.agent"
_log = logging.getLogger(__name__)


class AgentClient:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._closed_error: Exception | None = None
        self.events: asyncio.Queue[agent_pb2.Event | _ConnectionLost] = asyncio.Queue(MAX_QUEUED_EVENTS)
        # Put on `events` after the last event of a lost connection (see next_event).
        self._end_of_events: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._writer is not None and self._closed_error is None

    async def connect(self, timeout_s: float) -> None:
        """Connects to QEMU's end of the channel, retrying until QEMU has created the socket.

        No span of its own: callers call it without a context, and a span here would start a
        trace of its own instead of joining theirs."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(self.socket_path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as err:
                if time.monotonic() > deadline:
                    raise AgentTimeoutError(f"agent socket {self.socket_path} not accepting connections "
                                            f"after {timeout_s:.1f} s: {err}; is QEMU running with "
                                            f"-chardev socket,path={self.socket_path},server=on?") from err
                await asyncio.sleep(CONNECT_RETRY_S)
        self._forget_lost_connection()
        self._closed_error = None
        self._read_task = asyncio.ensure_future(self._read_loop())

    def _forget_lost_connection(self) -> None:
        """A new connection's events must not end at the previous connection's loss."""
        if self._end_of_events is not None:
            self._end_of_events.cancel()
            self._end_of_events = None
        kept = []
        while not self.events.empty():
            event = self.events.get_nowait()
            if not isinstance(event, _ConnectionLost):
                kept.append(event)
        for event in kept:
            self.events.put_nowait(event)

    async def _read_loop(self) -> None:
        decoder = framing.FrameDecoder()
        error: Exception = AgentError(f"agent socket {self.socket_path} closed")
        reader = self._reader
        assert reader is not None, "_read_loop runs only after connect"
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                for item in decoder.feed(chunk):
                    if isinstance(item, framing.OversizedFrame):
                        error = AgentError(f"guest agent sent a bad frame: {item.describe()}")
                        continue
                    await self._dispatch(item)
        except (OSError, asyncio.IncompleteReadError) as err:
            error = AgentError(f"agent socket {self.socket_path} failed: {err}")
        finally:
            self._closed_error = error
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()
            # After the events already queued, whenever their reader makes room.
            self._end_of_events = asyncio.ensure_future(self.events.put(_ConnectionLost(error)))

    async def _dispatch(self, payload: bytes) -> None:
        message = agent_pb2.GuestMessage()
        try:
            message.ParseFromString(payload)
        except Exception:
            return  # garbage from the guest: nothing to match it to
        kind = message.WhichOneof("kind")
        if kind == "event":
            if message.event.WhichOneof("kind") in _PROCESS_EVENTS:
                await self.events.put(message.event)  # backpressure: see MAX_QUEUED_EVENTS
            elif not self.events.full():
                self.events.put_nowait(message.event)
            return
        if kind == "response":
            future = self._pending.pop(message.response.id, None)
            if future is not None and not future.done():
                future.set_result(message.response)
            # An unmatched id answers a request of an earlier owner: ignore it. Id 0 is the
            # agent saying it could not decode a frame at all: worth a line in the log.
            if message.response.id == 0 and message.response.error:
                _log.warning("guest agent on %s: %s", self.socket_path, message.response.error)

    async def _call(self, name: str, field: str, request: Any, timeout_s: float | None, ctx: Context | None) -> Any:
        """One request and its reply; `timeout_s` None waits as long as the guest takes."""
        with tracing.span(_TRACER, f"agent.{name}", ctx, subsystem="agent"):
            if self._writer is None:
                raise AgentError(f"agent client for {self.socket_path} is not connected")
            if self._closed_error is not None:
                raise self._closed_error
            request_id = next(self._ids)
            envelope = agent_pb2.Request(id=request_id)
            getattr(envelope, field).CopyFrom(request)
            future = asyncio.get_running_loop().create_future()
            self._pending[request_id] = future
            try:
                self._writer.write(framing.encode_frame(envelope.SerializeToString()))
                await self._writer.drain()
                response = await asyncio.wait_for(future, timeout_s)
            except asyncio.TimeoutError:
                raise AgentTimeoutError(f"guest agent did not answer {name} on {self.socket_path} "
                                        f"within {timeout_s:.1f} s") from None
            except OSError as err:
                raise AgentError(f"sending {name} to {self.socket_path} failed: {err}") from err
            finally:
                self._pending.pop(request_id, None)
            if response.error:
                error = (AgentUnsupportedError if response.error.startswith(framing.UNSUPPORTED_REQUEST)
                         else AgentError)
                raise error(f"guest agent refused {name}: {response.error}")
            return getattr(response, field)

    # ---- requests ------------------------------------------------------------

    async def check(self, timeout_s: float = REQUEST_TIMEOUT_S, ctx: Context | None = None) -> agent_pb2.CheckReply:
        return cast(agent_pb2.CheckReply, await self._call("Check", "check", agent_pb2.CheckRequest(), timeout_s, ctx))

    async def get_guest_details(self, timeout_s: float = REQUEST_TIMEOUT_S,
                                ctx: Context | None = None) -> agent_pb2.GetGuestDetailsReply:
        reply = await self._call("GetGuestDetails", "get_guest_details", agent_pb2.GetGuestDetailsRequest(),
                                 timeout_s, ctx)
        return cast(agent_pb2.GetGuestDetailsReply, reply)

    async def reseed_random_dev(self, data: bytes, timeout_s: float = REQUEST_TIMEOUT_S,
                                ctx: Context | None = None) -> None:
        await self._call("ReseedRandomDev", "reseed_random_dev", agent_pb2.ReseedRandomDevRequest(data=data),
                         timeout_s, ctx)

    async def set_guest_date_time(self, sec: int, usec: int, timeout_s: float = REQUEST_TIMEOUT_S,
                                  ctx: Context | None = None) -> None:
        await self._call("SetGuestDateTime", "set_guest_date_time",
                         agent_pb2.SetGuestDateTimeRequest(sec=sec, usec=usec), timeout_s, ctx)

    async def handoff(self, data: bytes, sec: int, usec: int, timeout_s: float = REQUEST_TIMEOUT_S,
                      ctx: Context | None = None) -> agent_pb2.HandoffReply:
        """Reseed with `data`, set the clock and check, in one round trip (a VM resumed for a new owner)."""
        reply = await self._call("Handoff", "handoff", agent_pb2.HandoffRequest(data=data, sec=sec, usec=usec),
                                 timeout_s, ctx)
        return cast(agent_pb2.HandoffReply, reply)

    async def online_cpu_mem(self, nb_cpus: int = 0, cpu_only: bool = False, wait: bool = False,
                             memory_mib: int = 0, timeout_s: float = REQUEST_TIMEOUT_S,
                             ctx: Context | None = None) -> agent_pb2.OnlineCPUMemReply:
        """With wait: answers once nb_cpus CPUs and memory_mib MiB are online (0: not checked)."""
        request = agent_pb2.OnlineCPUMemRequest(nb_cpus=nb_cpus, cpu_only=cpu_only, wait=wait, memory_mib=memory_mib)
        reply = await self._call("OnlineCPUMem", "online_cpu_mem", request, timeout_s, ctx)
        return cast(agent_pb2.OnlineCPUMemReply, reply)

    async def read_random(self, length: int, timeout_s: float = REQUEST_TIMEOUT_S, ctx: Context | None = None) -> bytes:
        reply = await self._call("ReadRandom", "read_random", agent_pb2.ReadRandomRequest(length=length),
                                 timeout_s, ctx)
        return bytes(reply.data)

    # ---- processes -----------------------------------------------------------
    # Output and exits arrive as ProcessOutput / ProcessExited events: read them with next_event.

    async def next_event(self) -> agent_pb2.Event:
        """The next guest event, in the order sent; AgentError once the connection is gone and
        every event that came before the loss has been returned."""
        event = await self.events.get()
        if isinstance(event, _ConnectionLost):
            self.events.put_nowait(event)  # every later call fails the same way
            raise event.error
        return event

    async def mount_shared(self, tag: str, mount_point: str, timeout_s: float = REQUEST_TIMEOUT_S,
                           ctx: Context | None = None) -> None:
        """Mounts the VM's virtio-9p share `tag` at `mount_point` in the guest (idempotent)."""
        await self._call("MountShared", "mount_shared",
                         agent_pb2.MountSharedRequest(tag=tag, mount_point=mount_point), timeout_s, ctx)

    async def create_process(self, exec_id: str, args: list[str], env: list[str], cwd: str, uid: int, gid: int,
                             additional_gids: list[int], rootfs: str, rootfs_readonly: bool = False,
                             hostname: str = "", open_stdin: bool = False, *,
                             container_exec_id: str = "", capabilities: dict[str, list[str]] | None = None,
                             rlimits: Sequence[tuple[str, int, int]] = (), no_new_privileges: bool = False,
                             mounts: Sequence[dict[str, Any]] = (), readonly_paths: Sequence[str] = (),
                             masked_paths: Sequence[str] = (), guest_root: bool = False, terminal: bool = False,
                             sysctls: Mapping[str, str] | None = None, trace_timing: bool = False,
                             timeout_s: float = REQUEST_TIMEOUT_S, ctx: Context | None = None) -> int:
        """Creates the process in the guest, contained and waiting for start_process; returns its guest pid.

        `container_exec_id`: an exec, joining that running container's namespaces. `capabilities`:
        OCI sets by name ({"bounding": ["CAP_KILL"], ...}); None gives the guest's default set.
        `mounts`: OCI mount objects (type, source inside the rootfs for binds, destination,
        options). `guest_root`: uncontained in the guest's root (host-trusted tests only).
        `terminal`: a pty in the guest as the process's controlling terminal and stdio; its output
        is all stream 1, write_stdin types into it, resize_console sets its size.
        `trace_timing`: the guest reports where the set-up's time went (a "vmf-contain timing:"
        line on the process's stderr, the agent's share in the guest's console log).
        A missing executable or cwd inside `rootfs` is an AgentError here, not an exit status.
        """
        request = agent_pb2.CreateProcessRequest(
            exec_id=exec_id, args=args, env=env, cwd=cwd, uid=uid, gid=gid, additional_gids=additional_gids,
            rootfs=rootfs, rootfs_readonly=rootfs_readonly, hostname=hostname, open_stdin=open_stdin,
            container_exec_id=container_exec_id, no_new_privileges=no_new_privileges, guest_root=guest_root,
            readonly_paths=readonly_paths, masked_paths=masked_paths, sysctls=dict(sysctls or {}),
            terminal=terminal, trace_timing=trace_timing,
            rlimits=[agent_pb2.Rlimit(type=kind, soft=soft, hard=hard) for kind, soft, hard in rlimits],
            mounts=[agent_pb2.Mount(type=m["type"], source=m.get("source", ""), destination=m["destination"],
                                    options=m.get("options", []), shared=bool(m.get("shared")))
                    for m in mounts])
        if capabilities is not None:
            request.capabilities.SetInParent()
            for field in ("bounding", "effective", "permitted", "inheritable", "ambient"):
                getattr(request.capabilities, field).extend(capabilities.get(field, []))
        reply = await self._call("CreateProcess", "create_process", request, timeout_s, ctx)
        return int(reply.pid)

    async def start_process(self, exec_id: str, timeout_s: float = REQUEST_TIMEOUT_S,
                            ctx: Context | None = None) -> None:
        """Execs the created process; an exec failure is an AgentError."""
        await self._call("StartProcess", "start_process", agent_pb2.StartProcessRequest(exec_id=exec_id),
                         timeout_s, ctx)

    async def wait_process(self, exec_id: str, timeout_s: float | None = None, ctx: Context | None = None) -> int:
        """The process's exit status (128 + signal if killed). No timeout unless given: a
        container may rightly run for days."""
        reply = await self._call("WaitProcess", "wait_process", agent_pb2.WaitProcessRequest(exec_id=exec_id),
                                 timeout_s, ctx)
        return int(reply.exit_status)

    async def signal_process(self, exec_id: str, signal: int, timeout_s: float = REQUEST_TIMEOUT_S,
                             ctx: Context | None = None) -> None:
        await self._call("SignalProcess", "signal_process",
                         agent_pb2.SignalProcessRequest(exec_id=exec_id, signal=int(signal)), timeout_s, ctx)

    async def write_stdin(self, exec_id: str, data: bytes, timeout_s: float = REQUEST_TIMEOUT_S,
                          ctx: Context | None = None) -> None:
        """Answered once the guest's pipe took all of `data` (the process reads slowly: this waits)."""
        # A frame holds at most MAX_FRAME_BYTES; leave room for the envelope.
        step = framing.MAX_FRAME_BYTES - 4096
        for offset in range(0, max(len(data), 1), step):
            await self._call("WriteStdin", "write_stdin",
                             agent_pb2.WriteStdinRequest(exec_id=exec_id, data=data[offset:offset + step]),
                             timeout_s, ctx)

    async def close_stdin(self, exec_id: str, timeout_s: float = REQUEST_TIMEOUT_S, ctx: Context | None = None) -> None:
        await self._call("CloseStdin", "close_stdin", agent_pb2.CloseStdinRequest(exec_id=exec_id), timeout_s, ctx)

    async def resize_console(self, exec_id: str, rows: int, cols: int, timeout_s: float = REQUEST_TIMEOUT_S,
                             ctx: Context | None = None) -> None:
        """Sets the window size of a process created with terminal (from its create_process on)."""
        await self._call("ResizeConsole", "resize_console",
                         agent_pb2.ResizeConsoleRequest(exec_id=exec_id, rows=rows, cols=cols), timeout_s, ctx)

    async def close(self) -> None:
        """Lets go of the socket; the guest keeps serving the next owner."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
        if self._read_task is not None:
            self._read_task.cancel()
            await asyncio.gather(self._read_task, return_exceptions=True)
            self._read_task = None
        if self._end_of_events is not None:
            self._end_of_events.cancel()
            await asyncio.gather(self._end_of_events, return_exceptions=True)
            self._end_of_events = None


class _ConnectionLost:
    """Queued after the last event of a lost connection."""

    def __init__(self, error: Exception) -> None:
        self.error = error
