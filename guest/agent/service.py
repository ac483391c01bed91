"""The agent's single-threaded poll loop: the virtio-serial port, uevents, and wake-ups.

Port behaviour this loop is built around (virtio_console in the guest, QEMU socket chardev on the
host):
  * While no host is connected, poll() reports POLLHUP at once, every time: the port is then
    left out of the poll set and re-probed on SIGIO (sent by the driver when the host side opens
    or closes) or, as a fallback, on a backed-off timer. No spinning.
  * Writes while no host is connected fail with EAGAIN (the port is non-blocking), so outgoing
    frames wait in a queue. When a host leaves, the responses meant for it and any half-written
    frame are dropped (a new host's decoder starts at a frame boundary); events are kept for the
    next host.
  * Input left over from a host that died mid-frame is drained and the decoder reset, so the
    next host's first frame decodes.
  * Process output becomes events too. While the queue is long (a slow or absent host) the loop
    stops reading the processes' pipes, so a chatty process blocks on its pipe instead of the
    agent growing or dropping output.
"""

from __future__ import annotations

import errno
import math
import os
import select
import time
from collections import deque
from typing import Callable, Deque, Iterable, List, Optional

from guest.agent.handler import AgentHandler
from guest.agent.log import log
from guest.agent.uevent import UeventSocket
from protocols.agent import agent_pb2
from protocols.agent.framing import FrameDecoder, encode_frame

# Re-probe delays for a port with no host: SIGIO normally wakes the loop at once; the timer only
# covers a lost signal, so it can back off to a second without costing connect latency.
RECHECK_MIN_S = 0.02
RECHECK_MAX_S = 1.0
# One read per poll wake-up; a request is at most a few KiB today.
READ_CHUNK_BYTES = 64 * 1024
# Events waiting for a host: bounded so a VM nobody talks to cannot grow the agent without limit.
# Only informational events are dropped over it; process output and exits are bounded by the
# backlog below (output waits in the pipes) and are never dropped.
MAX_QUEUED_EVENTS = 1024
_PROCESS_EVENTS = frozenset({"process_output", "process_exited"})
# Above either, process output is left in its pipes until the host catches up (well below the
# limit above, so output and exit events are never the ones dropped).
OUTPUT_BACKLOG_EVENTS = MAX_QUEUED_EVENTS // 4
OUTPUT_BACKLOG_BYTES = 4 << 20

_HUP_OR_ERROR = select.POLLHUP | select.POLLERR | select.POLLNVAL


class PortError(Exception):
    """The port itself failed (not just "no host"); the agent exits and init restarts it."""


class _Outgoing:
    __slots__ = ("frame", "is_response", "droppable", "offset")

    def __init__(self, frame: bytes, is_response: bool, droppable: bool = False) -> None:
        self.frame = frame
        self.is_response = is_response
        self.droppable = droppable
        self.offset = 0


class AgentService:
    def __init__(
        self,
        port_fd: int,
        handler: AgentHandler,
        *,
        uevents: Optional[UeventSocket] = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._port = port_fd
        self._handler = handler
        self._uevents = uevents
        self._monotonic = monotonic
        self._decoder = FrameDecoder()
        self._out: Deque[_Outgoing] = deque()
        self._queued_events = 0
        # None until the first poll tells; then True/False.
        self._host_connected: Optional[bool] = None
        self._recheck_interval = RECHECK_MIN_S
        self._recheck_at = 0.0
        self._stopping = False
        # Self-pipe: stop() and (in the guest) the SIGIO handler via signal.set_wakeup_fd.
        self._wake_r, self.wakeup_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # --- control ---------------------------------------------------------------------------------

    @property
    def host_connected(self) -> Optional[bool]:
        return self._host_connected

    def stop(self) -> None:
        """Make run() return (callable from another thread or a signal handler)."""
        self._stopping = True
        try:
            os.write(self.wakeup_fd, b"s")
        except BlockingIOError:
            pass

    def enqueue(self, messages: Iterable[agent_pb2.GuestMessage]) -> None:
        for message in messages:
            is_response = message.WhichOneof("kind") == "response"
            droppable = not is_response and message.event.WhichOneof("kind") not in _PROCESS_EVENTS
            self._out.append(_Outgoing(encode_frame(message.SerializeToString()), is_response, droppable))
            if not is_response:
                self._queued_events += 1
        if self._queued_events > MAX_QUEUED_EVENTS:
            self._drop_oldest_events(self._queued_events - MAX_QUEUED_EVENTS)
        if self._host_connected:
            self._flush()

    def run(self) -> None:
        while not self._stopping:
            self.run_once()
        os.close(self._wake_r)
        os.close(self.wakeup_fd)

    # --- one iteration ---------------------------------------------------------------------------

    def run_once(self, max_wait_s: Optional[float] = None) -> None:
        """Wait for something to do (at most `max_wait_s`, if given) and do it."""
        timeouts: List[float] = [] if max_wait_s is None else [max_wait_s]
        until_tick = self._handler.seconds_until_tick()
        if until_tick is not None:
            timeouts.append(until_tick)
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        if self._uevents is not None:
            poller.register(self._uevents.fileno(), select.POLLIN)
        watch_port = self._host_connected is not False
        if watch_port:
            poller.register(self._port, select.POLLIN | (select.POLLOUT if self._out else 0))
        else:
            timeouts.append(max(0.0, self._recheck_at - self._monotonic()))
        handler_fds = self._handler.poll_fds(read_output=not self._backlogged())
        for fd, events in handler_fds.items():
            poller.register(fd, events)
        timeout_ms = math.ceil(min(timeouts) * 1000) if timeouts else None
        ready = dict(poller.poll(timeout_ms))

        if self._wake_r in ready:
            self._drain_wakeups()
            self._recheck_at = 0.0  # SIGIO: the host side opened or closed; look now
        if self._uevents is not None and self._uevents.fileno() in ready:
            events = self._uevents.receive_all()
            rescan = self._uevents.overflowed
            self._uevents.overflowed = False
            self.enqueue(self._handler.handle_uevents(events, rescan=rescan))
        if watch_port and self._port in ready:
            self._service_port(ready[self._port])
        elif not watch_port and self._monotonic() >= self._recheck_at:
            self._probe_host()
        handler_ready = {fd: revents for fd, revents in ready.items() if fd in handler_fds}
        if handler_ready:
            self.enqueue(self._handler.handle_fds(handler_ready))
        self.enqueue(self._handler.tick())

    def _backlogged(self) -> bool:
        if self._queued_events >= OUTPUT_BACKLOG_EVENTS:
            return True
        return sum(len(item.frame) - item.offset for item in self._out) >= OUTPUT_BACKLOG_BYTES

    def _service_port(self, revents: int) -> None:
        if revents & (select.POLLERR | select.POLLNVAL):
            raise PortError(f"poll on the agent port reported {revents:#x} (error)")
        if revents & select.POLLHUP:
            self._host_gone()
            return
        if self._host_connected is None:
            self._host_arrived()
        if revents & select.POLLIN:
            self._read()
        if revents & select.POLLOUT and self._host_connected:
            self._flush()

    # --- host presence ---------------------------------------------------------------------------

    def _probe_host(self) -> None:
        probe = select.poll()
        probe.register(self._port, select.POLLIN)
        revents = dict(probe.poll(0)).get(self._port, 0)
        if revents & _HUP_OR_ERROR:
            self._recheck_interval = min(self._recheck_interval * 2, RECHECK_MAX_S)
            self._recheck_at = self._monotonic() + self._recheck_interval
            return
        self._host_arrived()
        if revents & select.POLLIN:
            self._read()

    def _host_arrived(self) -> None:
        self._host_connected = True
        self._recheck_interval = RECHECK_MIN_S
        self._decoder.reset()
        log(f"host connected ({len(self._out)} frames queued)")
        self._flush()

    def _host_gone(self) -> None:
        was_connected = self._host_connected
        self._host_connected = False
        discarded = self._drain_input()
        self._decoder.reset()
        dropped = self._drop_stale_output()
        cancelled = self._handler.cancel_pending()
        self._recheck_interval = RECHECK_MIN_S
        self._recheck_at = self._monotonic() + RECHECK_MIN_S
        if was_connected is not False:
            log(
                f"no host connected (discarded {discarded} input bytes, {dropped} responses, "
                f"{cancelled} waiting requests)"
            )

    # --- I/O -------------------------------------------------------------------------------------

    def _read(self) -> None:
        try:
            data = os.read(self._port, READ_CHUNK_BYTES)
        except BlockingIOError:
            return
        if not data:  # EOF: the host side closed
            self._host_gone()
            return
        for item in self._decoder.feed(data):
            self.enqueue(self._handler.handle_frame(item))

    def _flush(self) -> None:
        while self._out:
            head = self._out[0]
            try:
                written = os.write(self._port, memoryview(head.frame)[head.offset :])
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ENODEV, errno.EIO, errno.ECONNRESET):
                    log(f"write to the agent port failed ({exc}); treating the host as gone")
                    self._host_gone()
                    return
                raise
            head.offset += written
            if head.offset < len(head.frame):
                continue
            self._out.popleft()
            if not head.is_response:
                self._queued_events -= 1

    def _drain_input(self) -> int:
        total = 0
        while True:
            try:
                data = os.read(self._port, READ_CHUNK_BYTES)
            except (BlockingIOError, OSError):
                return total
            if not data:
                return total
            total += len(data)

    def _drop_stale_output(self) -> int:
        kept: Deque[_Outgoing] = deque()
        dropped = 0
        for index, item in enumerate(self._out):
            if item.is_response:
                dropped += 1
            elif index == 0 and item.offset:
                self._queued_events -= 1  # half-sent: its tail would desync the next host
            else:
                kept.append(item)
        self._out = kept
        return dropped

    def _drop_oldest_events(self, count: int) -> None:
        kept: Deque[_Outgoing] = deque()
        for index, item in enumerate(self._out):
            if count and item.droppable and not (index == 0 and item.offset):
                count -= 1
                self._queued_events -= 1
                continue
            kept.append(item)
        self._out = kept
        log(f"event queue full ({MAX_QUEUED_EVENTS}): dropped the oldest informational events")

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 256):
                pass
        except BlockingIOError:
            pass
