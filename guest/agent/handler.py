"""The agent's logic: decoded frames in, GuestMessages out. No device I/O of the channel here.

AgentHandler is driven by the service loop (guest/agent/service.py) in the guest and directly by
unit tests on the host: guest state is reached through a GuestRoot, the clock and mount(2) through
callables. Container processes live in a ProcessTable (guest/agent/processes.py) whose pipes the
service loop watches through poll_fds() and handle_fds().
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from google.protobuf.message import DecodeError

from guest.agent import AGENT_VERSION, hotplug, mounts
from guest.agent.guestfs import GuestRoot
from guest.agent.log import describe_exception, log
from guest.agent.messages import RequestError, reply_message, response_message
from guest.agent.processes import WARM_UP_ROOTFS, ProcessTable
from guest.agent.uevent import Uevent
from protocols.agent import agent_pb2
from protocols.agent.framing import PROTOCOL_VERSION, UNSUPPORTED_REQUEST, OversizedFrame

# ioctl RNDRESEEDCRNG (_IO('R', 0x07)): make the CRNG reseed now from the pool we just fed, so
# bytes read right after the request already differ between clones.
RNDRESEEDCRNG = 0x5207
# ReadRandom answers fit comfortably in one frame and a test needs no more.
MAX_READ_RANDOM_BYTES = 4096
# Bound for OnlineCPUMem{wait}. Under TCG (QEMU 7.2) the first CPU hot-added to a 1-vCPU guest
# takes ~12.5 s to come online unless the kernel runs with no_ipi_broadcast=1 (then ~1 s); 20 s
# covers both. Memory blocks are waited for too (a DIMM's appear after earlier ACPI events are
# handled). A hot-add that stalls past this (24-44 s was once reported under TCG on a loaded host;
# not reproduced here in ~60 hot-adds, serial and 3 clones at once) gets an error naming what
# stayed offline instead of a hang. The host's own timeout for that call must be longer
# (factory/agent/client.py).
ONLINE_WAIT_TIMEOUT_S = 20.0
# While an OnlineCPUMem{wait} is pending, sysfs is rescanned this often in case a uevent is lost.
ONLINE_WAIT_RESCAN_S = 0.05

DecodedItem = Union[bytes, OversizedFrame]


class _PendingOnline:
    def __init__(self, request_id: int, request: agent_pb2.OnlineCPUMemRequest, deadline: float) -> None:
        self.request_id = request_id
        self.request = request
        self.deadline = deadline
        self.onlined_cpus: List[int] = []
        self.onlined_blocks: List[int] = []


class AgentHandler:
    def __init__(
        self,
        root: GuestRoot | None = None,
        *,
        set_realtime_ns: Callable[[int], None] = lambda ns: time.clock_settime_ns(time.CLOCK_REALTIME, ns),
        monotonic: Callable[[], float] = time.monotonic,
        online_wait_timeout_s: float = ONLINE_WAIT_TIMEOUT_S,
        mount: mounts.MountFunction = mounts.mount_syscall,
        warm_up: bool = False,
    ) -> None:
        self.root = root if root is not None else GuestRoot()
        self._set_realtime_ns = set_realtime_ns
        self._monotonic = monotonic
        self._online_wait_timeout_s = online_wait_timeout_s
        self._pending: List[_PendingOnline] = []
        self._mount = mount
        self.processes = ProcessTable(mountinfo_path=self._mountinfo_path, mount=mount, contain_path=root.contain,
                                      warm_up_rootfs=self.root.path(WARM_UP_ROOTFS.lstrip("/")))
        self._warm_up = warm_up

    @property
    def _mountinfo_path(self) -> str:
        return self.root.path("proc/self/mountinfo")

    # --- entry points for the service loop -------------------------------------------------------

    def startup_messages(self) -> List[agent_pb2.GuestMessage]:
        """Online whatever is offline already, and announce the agent."""
        self._online_everything(cpu_only=False)
        message = agent_pb2.GuestMessage()
        started = message.event.agent_started
        started.agent_version = AGENT_VERSION
        started.protocol_version = PROTOCOL_VERSION
        started.boot_id = self.root.boot_id()
        started.uptime_seconds = time.clock_gettime(time.CLOCK_BOOTTIME)
        return [message]

    def handle_frame(self, item: DecodedItem) -> List[agent_pb2.GuestMessage]:
        """Messages answering one decoded frame (none yet if the answer has to wait)."""
        if isinstance(item, OversizedFrame):
            return [response_message(0, f"request rejected: {item.describe()}")]
        try:
            request = agent_pb2.Request.FromString(item)
        except DecodeError as exc:
            return [response_message(0, f"undecodable request frame of {len(item)} bytes: {exc}")]
        kind = request.WhichOneof("kind")
        method = getattr(self, f"_handle_{kind}", None) if kind else None
        if method is None:
            return [
                response_message(
                    request.id,
                    f"{UNSUPPORTED_REQUEST} (no known request set in Request {request.id}); this agent "
                    f"{AGENT_VERSION} speaks protocol version {PROTOCOL_VERSION}",
                )
            ]
        try:
            reply = method(request.id, getattr(request, kind))
        except RequestError as exc:
            return [response_message(request.id, f"{kind}: {exc}")]
        except OSError as exc:
            return [response_message(request.id, f"{kind}: {exc}")]
        except Exception as exc:  # keep serving: one bad handler must not kill the agent
            description = describe_exception(exc)
            log(f"internal error in {kind}: {description}")
            return [response_message(request.id, f"{kind}: internal agent error: {description}")]
        if reply is None:
            return []
        return reply if isinstance(reply, list) else [reply]

    def handle_uevents(self, uevents: Sequence[Uevent], rescan: bool = False) -> List[agent_pb2.GuestMessage]:
        """Online hot-plugged CPUs and memory named by "add" uevents (everything if `rescan`)."""
        cpus: List[int] = []
        blocks: List[int] = []
        for uevent in uevents:
            if uevent.action != "add":
                continue
            if uevent.subsystem == "cpu":
                number = hotplug.device_number(uevent.devpath, "cpu")
                if number is not None:
                    cpus.append(number)
            elif uevent.subsystem == "memory":
                number = hotplug.device_number(uevent.devpath, "memory")
                if number is not None:
                    blocks.append(number)
        if not (cpus or blocks or rescan):
            return []
        cpu_result = hotplug.online_cpus(self.root, None if rescan else cpus)
        memory_result = hotplug.online_memory(self.root, None if rescan else blocks)
        for failure in cpu_result.failures + memory_result.failures:
            log(f"could not online {failure}")
        messages = self.tick()
        if cpu_result.onlined or memory_result.onlined:
            event = agent_pb2.GuestMessage()
            onlined = event.event.cpu_mem_onlined
            onlined.cpus.extend(cpu_result.onlined)
            onlined.memory_blocks.extend(memory_result.onlined)
            onlined.online_cpus = hotplug.count_online_cpus(self.root)
            onlined.mem_total_kib = self.root.mem_total_kib()
            log(f"onlined cpus {cpu_result.onlined} memory blocks {memory_result.onlined}")
            messages.append(event)
        return messages

    def poll_fds(self, read_output: bool = True) -> Dict[int, int]:
        """fd -> poll events the service loop should watch for the handler (process pipes and
        pidfds). `read_output` False while the host is behind: see ProcessTable.poll_fds."""
        return self.processes.poll_fds(read_output)

    def handle_fds(self, ready: Dict[int, int]) -> List[agent_pb2.GuestMessage]:
        """Messages from the handler's fds that poll reported ready (fd -> revents)."""
        return self.processes.handle_ready(ready)

    def tick(self) -> List[agent_pb2.GuestMessage]:
        """Collect exited processes; answer the OnlineCPUMem{wait} requests that are satisfied or
        out of time."""
        done: List[agent_pb2.GuestMessage] = self.processes.reap()
        if not self._pending:
            return done
        now = self._monotonic()
        still: List[_PendingOnline] = []
        for pending in self._pending:
            try:
                answer = self._advance_online(pending, now)
            except Exception as exc:
                answer = response_message(pending.request_id, f"online_cpu_mem: {describe_exception(exc)}")
            if answer is None:
                still.append(pending)
            else:
                done.append(answer)
        self._pending = still
        return done

    def seconds_until_tick(self) -> Optional[float]:
        """How long the service loop may sleep before tick() has work; None: no deadline."""
        reap = self.processes.seconds_until_reap()
        if not self._pending:
            return reap
        until_deadline = min(p.deadline for p in self._pending) - self._monotonic()
        wait = max(0.0, min(ONLINE_WAIT_RESCAN_S, until_deadline))
        return wait if reap is None else min(wait, reap)

    def cancel_pending(self) -> int:
        """Drop waiting requests (their host went away). Returns how many were dropped.

        Processes keep running and their events stay queued for the next host; only the answers
        owed to the host that left are forgotten."""
        count = len(self._pending) + self.processes.cancel_replies()
        self._pending = []
        return count

    # --- requests --------------------------------------------------------------------------------

    def _reply(self, request_id: int, kind: str) -> agent_pb2.GuestMessage:
        return reply_message(request_id, kind)

    def _handle_check(self, request_id: int, request: agent_pb2.CheckRequest) -> agent_pb2.GuestMessage:
        message = self._reply(request_id, "check")
        message.response.check.agent_version = AGENT_VERSION
        message.response.check.protocol_version = PROTOCOL_VERSION
        return message

    def _handle_get_guest_details(
        self, request_id: int, request: agent_pb2.GetGuestDetailsRequest
    ) -> agent_pb2.GuestMessage:
        message = self._reply(request_id, "get_guest_details")
        details = message.response.get_guest_details
        details.boot_id = self.root.boot_id()
        details.uptime_seconds = time.clock_gettime(time.CLOCK_BOOTTIME)
        details.kernel_release = os.uname().release
        details.online_cpus = hotplug.count_online_cpus(self.root)
        details.mem_total_kib = self.root.mem_total_kib()
        wall = time.clock_gettime_ns(time.CLOCK_REALTIME)
        details.wall_clock_sec, details.wall_clock_nsec = divmod(wall, 1_000_000_000)
        return message

    def _handle_reseed_random_dev(
        self, request_id: int, request: agent_pb2.ReseedRandomDevRequest
    ) -> agent_pb2.GuestMessage:
        self._reseed(request.data)
        return self._reply(request_id, "reseed_random_dev")

    def _handle_set_guest_date_time(
        self, request_id: int, request: agent_pb2.SetGuestDateTimeRequest
    ) -> agent_pb2.GuestMessage:
        self._set_clock(request.sec, request.usec)
        return self._reply(request_id, "set_guest_date_time")

    def _handle_handoff(self, request_id: int, request: agent_pb2.HandoffRequest) -> agent_pb2.GuestMessage:
        """Reseed, clock and check in one answer: the one round trip a resumed VM costs its new owner."""
        self._reseed(request.data)
        self._set_clock(request.sec, request.usec)
        message = self._reply(request_id, "handoff")
        message.response.handoff.agent_version = AGENT_VERSION
        message.response.handoff.protocol_version = PROTOCOL_VERSION
        return message

    def _reseed(self, data: bytes) -> None:
        if not data:
            raise RequestError("data is empty; send host entropy (e.g. 64 bytes of os.urandom)")
        fd = os.open(self.root.urandom, os.O_WRONLY | os.O_CLOEXEC)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise RequestError(f"wrote {written} of {len(data)} bytes to {self.root.urandom}")
            try:
                fcntl.ioctl(fd, RNDRESEEDCRNG)
            except OSError as exc:
                raise RequestError(f"ioctl RNDRESEEDCRNG on {self.root.urandom} failed: {exc}") from exc
        finally:
            os.close(fd)

    def _set_clock(self, sec: int, usec: int) -> None:
        if sec <= 0:
            raise RequestError(f"sec={sec} is not a time after 1970; send time.time_ns() // 10**9")
        if not 0 <= usec < 1_000_000:
            raise RequestError(f"usec={usec} is outside 0..999999")
        try:
            self._set_realtime_ns(sec * 1_000_000_000 + usec * 1000)
        except OverflowError as exc:
            raise RequestError(f"sec={sec} is out of range for the guest clock") from exc

    def _handle_read_random(self, request_id: int, request: agent_pb2.ReadRandomRequest) -> agent_pb2.GuestMessage:
        if not 0 < request.length <= MAX_READ_RANDOM_BYTES:
            raise RequestError(f"length={request.length} is outside 1..{MAX_READ_RANDOM_BYTES}")
        with open(self.root.urandom, "rb", buffering=0) as f:
            data = f.read(request.length)
        message = self._reply(request_id, "read_random")
        message.response.read_random.data = data
        return message

    def _handle_online_cpu_mem(
        self, request_id: int, request: agent_pb2.OnlineCPUMemRequest
    ) -> Optional[agent_pb2.GuestMessage]:
        possible = self.root.possible_cpus()
        if request.nb_cpus and possible is not None and request.nb_cpus > possible:
            raise RequestError(
                f"nb_cpus={request.nb_cpus} is more than the {possible} CPUs this VM can have "
                "(QEMU -smp maxcpus)"
            )
        pending = _PendingOnline(request_id, request, deadline=self._monotonic() + self._online_wait_timeout_s)
        answer = self._advance_online(pending, self._monotonic())
        if answer is None:
            self._pending.append(pending)
        return answer

    def _handle_mount_shared(
        self, request_id: int, request: agent_pb2.MountSharedRequest
    ) -> Optional[agent_pb2.GuestMessage]:
        if mounts.mount_9p_share(request.tag, request.mount_point, self._mountinfo_path, self._mount):
            log(f"mounted 9p share {request.tag!r} at {request.mount_point}")
            # The first mount in this VM (a template never mounts the share: it could not be
            # migrated): its containers are coming, and a cache mounts it before parking the VM.
            if self._warm_up and self.processes.warm_up(request_id, "mount_shared"):
                return None  # answered once the warm-up container is done
        return self._reply(request_id, "mount_shared")

    # Process requests: answered at once, or later (an empty list) when the child has not said yet.

    def _handle_create_process(
        self, request_id: int, request: agent_pb2.CreateProcessRequest
    ) -> List[agent_pb2.GuestMessage]:
        return self.processes.create(request_id, request)

    def _handle_start_process(
        self, request_id: int, request: agent_pb2.StartProcessRequest
    ) -> List[agent_pb2.GuestMessage]:
        return self.processes.start(request_id, request.exec_id)

    def _handle_wait_process(
        self, request_id: int, request: agent_pb2.WaitProcessRequest
    ) -> Optional[agent_pb2.GuestMessage]:
        return self.processes.wait(request_id, request.exec_id)

    def _handle_signal_process(
        self, request_id: int, request: agent_pb2.SignalProcessRequest
    ) -> agent_pb2.GuestMessage:
        self.processes.signal(request.exec_id, request.signal)
        return self._reply(request_id, "signal_process")

    # The stdin requests return a list: pushing this request's data may also finish earlier
    # requests that were waiting for room in the pipe.

    def _handle_write_stdin(
        self, request_id: int, request: agent_pb2.WriteStdinRequest
    ) -> List[agent_pb2.GuestMessage]:
        return self.processes.write_stdin(request_id, request.exec_id, request.data)

    def _handle_close_stdin(
        self, request_id: int, request: agent_pb2.CloseStdinRequest
    ) -> List[agent_pb2.GuestMessage]:
        return self.processes.close_stdin(request_id, request.exec_id)

    def _handle_resize_console(
        self, request_id: int, request: agent_pb2.ResizeConsoleRequest
    ) -> agent_pb2.GuestMessage:
        self.processes.resize(request.exec_id, request.rows, request.cols)
        return self._reply(request_id, "resize_console")

    # --- helpers ---------------------------------------------------------------------------------

    def _online_everything(self, cpu_only: bool) -> Tuple[hotplug.OnlineResult, hotplug.OnlineResult]:
        cpus = hotplug.online_cpus(self.root)
        memory = hotplug.OnlineResult() if cpu_only else hotplug.online_memory(self.root)
        return cpus, memory

    def _advance_online(self, pending: _PendingOnline, now: float) -> Optional[agent_pb2.GuestMessage]:
        """Online what is there; the reply if the request is satisfied or timed out, else None."""
        request = pending.request
        cpus, memory = self._online_everything(request.cpu_only)
        pending.onlined_cpus.extend(cpus.onlined)
        pending.onlined_blocks.extend(memory.onlined)
        online = hotplug.count_online_cpus(self.root)
        online_mib = hotplug.online_memory_mib(self.root)
        cpus_short = request.wait and request.nb_cpus > 0 and online < request.nb_cpus
        memory_short = (request.wait and request.memory_mib > 0 and not request.cpu_only
                        and online_mib < request.memory_mib)
        if (cpus_short or memory_short) and now < pending.deadline:
            return None
        failures = cpus.failures + memory.failures  # of the latest scan: earlier ones may have cleared
        if cpus_short or memory_short:
            missing = []
            if cpus_short:
                missing.append(
                    f"{online} of nb_cpus={request.nb_cpus} CPUs online "
                    f"(present: {hotplug.present_cpus(self.root)})"
                )
            if memory_short:
                missing.append(
                    f"{online_mib} of memory_mib={request.memory_mib} MiB online "
                    f"(offline blocks: {hotplug.offline_memory_blocks(self.root)}, "
                    f"block size {hotplug.memory_block_bytes(self.root) >> 20} MiB)"
                )
            return response_message(
                pending.request_id,
                f"online_cpu_mem: {' and '.join(missing)} after {self._online_wait_timeout_s:g} s"
                + (f"; failures: {', '.join(failures)}" if failures else "")
                + "; was it hot-plugged (QMP device_add), and is the guest kernel the pinned one?",
            )
        if failures:
            return response_message(pending.request_id, f"online_cpu_mem: could not online {', '.join(failures)}")
        message = self._reply(pending.request_id, "online_cpu_mem")
        reply = message.response.online_cpu_mem
        reply.onlined_cpus = len(pending.onlined_cpus)
        reply.onlined_memory_blocks = len(pending.onlined_blocks)
        reply.online_cpus = online
        reply.mem_total_kib = self.root.mem_total_kib()
        reply.online_memory_mib = online_mib
        return message
