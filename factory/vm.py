"""A VM: the QEMU process plus the channel to its guest agent, and its size.

What upstream's vm.go is: the factory strategies hand these out, get_vm post-
processes them, and VMCache moves them between processes (disconnect here,
re-attach there).
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import uuid
from pathlib import Path
from typing import Any

from opentelemetry.context import Context

from factory import ownership, sharedfs, tracing
from factory.agent.client import REQUEST_TIMEOUT_S, AgentClient
from factory.config import VMConfig
from factory.errors import AgentError, AgentTimeoutError, AgentUnsupportedError, BootError, HypervisorError
from factory.hypervisor.qemu import Qemu, QemuState
from factory.hypervisor.rundir import DEFAULT_RUN_ROOT, RunDir, tail
from hostos import process

# Entropy sent to the guest after every clone or hand-off (upstream: 512 bytes).
RESEED_BYTES = 512
# How often a boot wait checks that QEMU is still there.
LIVENESS_POLL_S = 0.05
# After the agent channel drops during boot, how long QEMU gets to finish exiting.
EXIT_GRACE_S = 2.0
# One try of the post-resume handshake; a resumed guest answers in tens of ms.
HANDSHAKE_TRY_S = 0.2
# A handoff sets the guest clock to the host time at sending, so the guest is behind by however
# long it took to handle it (a fresh TCG clone: ~0.1 s). A reply slower than this is followed by
# one more clock set, which the now-warm guest answers in a few ms.
CLOCK_RESYNC_AFTER_S = 0.03

_TRACER = "kata_vmfactory.vm"


@dataclasses.dataclass(frozen=True)
class VMStatus:
    """Upstream's GrpcVMStatus: a held VM's QEMU pid (0 when gone), CPUs and memory in MiB."""
    pid: int
    cpu: int
    memory: int


class VM:
    def __init__(self, config: VMConfig, hypervisor: Qemu, agent: AgentClient,
                 cpu: int, memory_mib: int, cpu_delta: int = 0) -> None:
        self.config = config
        self.hypervisor = hypervisor
        self.agent = agent
        self.cpu = cpu
        self.memory_mib = memory_mib
        self.cpu_delta = cpu_delta  # hot-added CPUs the guest has not onlined yet
        # True until the agent has answered on this connection (see handshake()).
        self.needs_handshake = True

    @property
    def id(self) -> str:
        return self.hypervisor.state.id

    @classmethod
    async def new(cls, config: VMConfig, run_root: str = DEFAULT_RUN_ROOT, ctx: Context | None = None,
                  vm_id: str | None = None) -> "VM":
        """Boots a VM from a valid() config. A directly booted VM is running with its agent
        answering; a clone (boot_from_template) comes back paused with its state loaded."""
        vm_id = vm_id or str(uuid.uuid4())
        hv = config.hypervisor
        with tracing.span(_TRACER, "vm.NewVM", ctx, subsystem="vm", vm_id=vm_id) as span_ctx:
            qemu = await Qemu.launch(hv, vm_id, run_root, span_ctx)
            vm = cls(config, qemu, AgentClient(str(qemu.run.agent_socket)), hv.num_vcpus, hv.memory_mib)
            try:
                await vm.agent.connect(config.agent.dial_timeout_s)
                if not hv.boot_from_template:
                    await vm.wait_agent(config.agent.dial_timeout_s, span_ctx)
            except BaseException:
                await vm.stop()
                raise
            return vm

    async def wait_agent(self, timeout_s: float, ctx: Context | None = None) -> None:
        """Waits for the guest agent's first answer; fails at once if QEMU dies meanwhile."""
        with tracing.span(_TRACER, "vm.WaitAgent", ctx, subsystem="vm", vm_id=self.id) as span_ctx:
            check = asyncio.ensure_future(self.agent.check(timeout_s=timeout_s, ctx=span_ctx))
            while not check.done():
                try:
                    await asyncio.wait({check}, timeout=LIVENESS_POLL_S)
                except asyncio.CancelledError:
                    check.cancel()
                    await asyncio.gather(check, return_exceptions=True)
                    raise
                if not check.done() and not self.hypervisor.is_alive():
                    check.cancel()
                    await asyncio.gather(check, return_exceptions=True)
                    raise BootError(f"VM {self.id}: QEMU exited before the guest agent answered\n"
                                    f"guest console (last lines):\n{tail(self.hypervisor.run.console_log)}")
            try:
                check.result()
                self.needs_handshake = False
            except AgentTimeoutError as err:
                raise AgentTimeoutError(f"{err}\nguest console (last lines):\n"
                                        f"{tail(self.hypervisor.run.console_log)}") from err
            except AgentError as err:
                # The channel closes when QEMU exits (a guest panic with -no-reboot).
                if await asyncio.to_thread(process.wait_gone, self.hypervisor.state.pid,
                                           self.hypervisor.state.pid_start_time, EXIT_GRACE_S):
                    raise BootError(f"VM {self.id}: QEMU exited before the guest agent answered\n"
                                    f"guest console (last lines):\n{tail(self.hypervisor.run.console_log)}") from err
                raise

    # ---- upstream VM methods ----------------------------------------------

    async def pause(self, ctx: Context | None = None) -> None:
        await self.hypervisor.pause(ctx)

    async def resume(self, ctx: Context | None = None) -> None:
        """Resumes the guest and, on a new agent connection, re-establishes the channel."""
        await self.hypervisor.resume(ctx)
        if self.needs_handshake:
            await self.handshake(self.config.agent.dial_timeout_s, ctx)

    async def handshake(self, timeout_s: float, ctx: Context | None = None) -> None:
        """Checks until the agent answers this connection.

        A resumed clone or handed-over VM may first process the previous
        owner's disconnect and drop what the new owner sent meanwhile, so the
        first Check is repeated (stale answers are ignored by id).
        """
        with tracing.span(_TRACER, "vm.Handshake", ctx, subsystem="vm", vm_id=self.id) as span_ctx:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    await self.agent.check(timeout_s=HANDSHAKE_TRY_S, ctx=span_ctx)
                    self.needs_handshake = False
                    return
                except AgentTimeoutError as err:
                    if not self.hypervisor.is_alive():
                        raise BootError(f"VM {self.id}: QEMU exited while resuming\n"
                                        f"guest console (last lines):\n"
                                        f"{tail(self.hypervisor.run.console_log)}") from err
                    if time.monotonic() > deadline:
                        raise

    async def save(self, state_path: str, ctx: Context | None = None) -> None:
        await self.hypervisor.save_template(state_path, ctx)

    async def share_rootfs(self, container_id: str, rootfs: str, readonly: bool,
                           ctx: Context | None = None) -> sharedfs.ShareMount:
        """Binds a host rootfs into this VM's share (the only part of it the guest may write) and
        has the guest mount the share; unbind with sharedfs.unbind from the returned record."""
        share = sharedfs.bind_rootfs(self.hypervisor.run, container_id, rootfs, readonly)
        try:
            await self.mount_share(ctx)  # a cached VM's guest has it mounted already: then a check
        except BaseException:
            sharedfs.unbind(share.mount_point, share.mount_id)
            raise
        return share

    async def mount_share(self, ctx: Context | None = None) -> None:
        """Has the guest mount this VM's 9p share (idempotent; nothing without one). The share
        holds nothing until a rootfs is bound into it, and the guest sees binds made later."""
        if self.config.hypervisor.shared_fs == "virtio-9p":
            await self.agent.mount_shared(sharedfs.SHARED_FS_TAG, sharedfs.GUEST_SHARED_DIR, ctx=ctx)

    def record(self) -> dict[str, Any]:
        """What another process needs to stop this VM later (stop_recorded), as JSON data."""
        return self.hypervisor.state.to_dict()

    async def wait_exited(self, timeout_s: float) -> bool:
        """True once this VM's QEMU is gone (within `timeout_s`), False if it is still running."""
        state = self.hypervisor.state
        return await asyncio.to_thread(process.wait_gone, state.pid, state.pid_start_time, timeout_s)

    async def disconnect(self) -> None:
        """Lets go of the agent and QMP channels, leaving the VM running or paused."""
        self.needs_handshake = True
        await self.agent.close()
        await self.hypervisor.disconnect()

    async def stop(self, ctx: Context | None = None) -> None:
        with tracing.span(_TRACER, "vm.Stop", ctx, subsystem="vm", vm_id=self.id) as span_ctx:
            try:
                await self.agent.close()
            finally:
                await self.hypervisor.stop(span_ctx)

    async def add_cpus(self, count: int, ctx: Context | None = None) -> int:
        if count <= 0:
            return 0
        added = await self.hypervisor.hotplug_cpus(count, ctx)
        self.cpu += added
        self.cpu_delta += added
        return added

    async def add_memory(self, size_mib: int, ctx: Context | None = None) -> None:
        if size_mib <= 0:
            return
        await self.hypervisor.hotplug_memory(size_mib, ctx)
        self.memory_mib += size_mib  # upstream forgets this; status would lie

    async def online_cpu_memory(self, ctx: Context | None = None) -> None:
        """Has the guest online hot-plugged CPUs and memory; returns once all of them are online.

        Both are waited for: a DIMM's memory blocks appear in the guest only after the ACPI
        events queued before it (a CPU hot-add's) are handled, so "the CPUs are up" does not
        mean the memory is. The agent's error names what stayed offline."""
        try:
            await self.agent.online_cpu_mem(nb_cpus=self.cpu, memory_mib=self.memory_mib, wait=True, ctx=ctx)
        except AgentError as err:
            raise type(err)(f"VM {self.id}: hot-plugged CPUs or memory not online ({self.cpu} CPUs and "
                            f"{self.memory_mib} MiB wanted): {err}; stop this VM and take another") from None
        self.cpu_delta = 0

    async def resume_for_owner(self, ctx: Context | None = None) -> None:
        """Resumes the guest for whoever takes it (a clone, a cache or VMCache hand-out): running,
        RNG reseeded, clock set and agent answering, in one agent round trip.

        The handoff request is sent before QMP `cont`, so the agent finds it waiting as soon as
        the guest runs. On a new connection it is repeated, like handshake()'s Check: the guest may
        first drop what arrived with the previous owner's disconnect (reseeding twice is harmless).
        """
        with tracing.span(_TRACER, "vm.Handoff", ctx, subsystem="vm", vm_id=self.id) as span_ctx:
            fresh_connection = self.needs_handshake
            deadline = time.monotonic() + self.config.agent.dial_timeout_s
            sent = time.monotonic()
            attempt = asyncio.ensure_future(self._handoff_once(fresh_connection, span_ctx))
            await asyncio.sleep(0)  # the attempt's first step writes the request: it leaves before `cont`
            try:
                await self.hypervisor.resume(span_ctx)
            except BaseException:
                attempt.cancel()
                await asyncio.gather(attempt, return_exceptions=True)
                raise
            while True:
                try:
                    await attempt
                    break
                except AgentUnsupportedError:
                    # An agent from before the handoff request (a VMCache server's VM made from an
                    # older image): it answered, so the channel works; the rest as it used to be.
                    self.needs_handshake = False
                    await asyncio.gather(self.reseed_rng(span_ctx), self.sync_time(span_ctx))
                    return
                except AgentTimeoutError as err:
                    if not fresh_connection or time.monotonic() > deadline:
                        raise
                    if not self.hypervisor.is_alive():
                        raise BootError(f"VM {self.id}: QEMU exited while resuming\n"
                                        f"guest console (last lines):\n"
                                        f"{tail(self.hypervisor.run.console_log)}") from err
                sent = time.monotonic()
                attempt = asyncio.ensure_future(self._handoff_once(fresh_connection, span_ctx))
            self.needs_handshake = False
            if time.monotonic() - sent > CLOCK_RESYNC_AFTER_S:
                await self.sync_time(span_ctx)

    async def _handoff_once(self, fresh_connection: bool, ctx: Context | None) -> None:
        now_ns = time.time_ns()
        await self.agent.handoff(os.urandom(RESEED_BYTES), now_ns // 1_000_000_000, (now_ns // 1000) % 1_000_000,
                                 timeout_s=HANDSHAKE_TRY_S if fresh_connection else REQUEST_TIMEOUT_S, ctx=ctx)

    async def reseed_rng(self, ctx: Context | None = None) -> None:
        await self.agent.reseed_random_dev(os.urandom(RESEED_BYTES), ctx=ctx)

    async def sync_time(self, ctx: Context | None = None) -> None:
        now_ns = time.time_ns()
        await self.agent.set_guest_date_time(now_ns // 1_000_000_000, (now_ns // 1000) % 1_000_000, ctx=ctx)

    def status(self) -> VMStatus:
        return VMStatus(pid=self.hypervisor.state.pid if self.hypervisor.is_alive() else 0,
                        cpu=self.cpu, memory=self.memory_mib)

    # ---- hand-over --------------------------------------------------------

    @classmethod
    async def attach(cls, config: VMConfig, state: QemuState, cpu: int, memory_mib: int, cpu_delta: int,
                     ctx: Context | None = None) -> "VM":
        """Takes over a VM another process started and disconnected from.

        QMP and the agent channel are connected at the same time (each is a socket connect and,
        for QMP, a greeting); the first failure cancels the other and releases what connected."""
        if not process.is_alive(state.pid, state.pid_start_time):
            raise HypervisorError(f"VM {state.id}: QEMU pid {state.pid} is not running")
        agent = AgentClient(str(RunDir(Path(state.run_root), state.id).agent_socket))
        qmp = asyncio.ensure_future(Qemu.from_state(state, ctx))
        channel = asyncio.ensure_future(agent.connect(config.agent.dial_timeout_s))
        try:
            await asyncio.gather(qmp, channel)
            qemu = qmp.result()
            # Ours now: the giver may exit (or be killed) without taking it along. A VMCache
            # server records its client as the owner before replying: then nothing to rewrite.
            me = ownership.current()
            if ownership.read(qemu.run.path) != me:
                qemu.record_owner(me)
        except BaseException:
            for task in (qmp, channel):
                task.cancel()
            await asyncio.gather(qmp, channel, return_exceptions=True)
            if qmp.done() and not qmp.cancelled() and qmp.exception() is None:
                await qmp.result().disconnect()
            await agent.close()
            raise
        return cls(config, qemu, agent, cpu, memory_mib, cpu_delta)


async def stop_recorded(record: dict[str, Any]) -> None:
    """Stops a VM another process started, from its record() (by pid and start time, never a
    recycled pid), and removes its run directory."""
    await Qemu(QemuState.from_dict(record)).stop()
