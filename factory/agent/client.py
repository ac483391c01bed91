"""AgentClient: requests to the guest agent over the VM's virtio-serial socket.

QEMU serves the socket (server=on), so the host may connect at any time and
reconnect after another process let go; requests are matched to responses by
id by one reader task, and guest events go to a queue.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from opentelemetry.context import Context

from factory import tracing
from factory.errors import AgentError, AgentTimeoutError
from protocols.agent import agent_pb2, framing

# Guest work under TCG is slow (a request takes a few ms, hot-plug onlining
# ~100 ms); 30 s means the guest is gone or wedged.
REQUEST_TIMEOUT_S = 30.0
CONNECT_RETRY_S = 0.005
# Events nobody reads must not grow without bound in a long-lived process.
MAX_QUEUED_EVENTS = 1024

_TRACER = "kata_vmfactory.agent"


class AgentClient:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._closed_error: Exception | None = None
        self.events: asyncio.Queue = asyncio.Queue(MAX_QUEUED_EVENTS)

    @property
    def connected(self) -> bool:
        return self._writer is not None and self._closed_error is None

    async def connect(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(self.socket_path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as err:
                if time.monotonic() > deadline:
                    raise AgentTimeoutError(f"agent socket {self.socket_path} not accepting connections "
                                            f"after {timeout_s:.1f} s: {err}") from err
                await asyncio.sleep(CONNECT_RETRY_S)
        self._closed_error = None
        self._read_task = asyncio.ensure_future(self._read_loop())

    async def _read_loop(self) -> None:
        decoder = framing.FrameDecoder()
        error: Exception = AgentError(f"agent socket {self.socket_path} closed")
        try:
            while True:
                chunk = await self._reader.read(65536)
                if not chunk:
                    break
                for item in decoder.feed(chunk):
                    if isinstance(item, framing.OversizedFrame):
                        error = AgentError(f"guest agent sent a bad frame: {item.describe()}")
                        continue
                    self._dispatch(item)
        except (OSError, asyncio.IncompleteReadError) as err:
            error = AgentError(f"agent socket {self.socket_path} failed: {err}")
        finally:
            self._closed_error = error
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()

    def _dispatch(self, payload: bytes) -> None:
        message = agent_pb2.GuestMessage()
        try:
            message.ParseFromString(payload)
        except Exception:
            return  # garbage from the guest: nothing to match it to
        kind = message.WhichOneof("kind")
        if kind == "event":
            if self.events.full():
                self.events.get_nowait()  # keep the newest
            self.events.put_nowait(message.event)
            return
        if kind == "response":
            future = self._pending.pop(message.response.id, None)
            if future is not None and not future.done():
                future.set_result(message.response)
            # An unmatched id answers a request of an earlier owner: ignore it.

    async def _call(self, name: str, field: str, request: Any, timeout_s: float, ctx: Context | None) -> Any:
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
                raise AgentError(f"guest agent refused {name}: {response.error}")
            return getattr(response, field)

    # ---- requests ------------------------------------------------------------

    async def check(self, timeout_s: float = REQUEST_TIMEOUT_S, ctx: Context | None = None) -> agent_pb2.CheckReply:
        return await self._call("Check", "check", agent_pb2.CheckRequest(), timeout_s, ctx)

    async def get_guest_details(self, timeout_s: float = REQUEST_TIMEOUT_S,
                                ctx: Context | None = None) -> agent_pb2.GetGuestDetailsReply:
        return await self._call("GetGuestDetails", "get_guest_details", agent_pb2.GetGuestDetailsRequest(), timeout_s, ctx)

    async def reseed_random_dev(self, data: bytes, timeout_s: float = REQUEST_TIMEOUT_S,
                                ctx: Context | None = None) -> None:
        await self._call("ReseedRandomDev", "reseed_random_dev", agent_pb2.ReseedRandomDevRequest(data=data), timeout_s, ctx)

    async def set_guest_date_time(self, sec: int, usec: int, timeout_s: float = REQUEST_TIMEOUT_S,
                                  ctx: Context | None = None) -> None:
        await self._call("SetGuestDateTime", "set_guest_date_time",
                         agent_pb2.SetGuestDateTimeRequest(sec=sec, usec=usec), timeout_s, ctx)

    async def online_cpu_mem(self, nb_cpus: int = 0, cpu_only: bool = False, wait: bool = False,
                             timeout_s: float = REQUEST_TIMEOUT_S,
                             ctx: Context | None = None) -> agent_pb2.OnlineCPUMemReply:
        return await self._call("OnlineCPUMem", "online_cpu_mem",
                                agent_pb2.OnlineCPUMemRequest(nb_cpus=nb_cpus, cpu_only=cpu_only, wait=wait), timeout_s, ctx)

    async def read_random(self, length: int, timeout_s: float = REQUEST_TIMEOUT_S, ctx: Context | None = None) -> bytes:
        reply = await self._call("ReadRandom", "read_random", agent_pb2.ReadRandomRequest(length=length), timeout_s, ctx)
        return reply.data

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
