"""The cache strategy: N workers keep N paused VMs ready and refill at once.

Better than upstream: a failed boot is retried with backoff and shown in
status instead of closing the whole cache; a ready VM whose QEMU died is
dropped and replaced, never handed out; a wait for a VM is bounded.
"""
from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from typing import Any, Callable

from opentelemetry.context import Context

from factory import ownership, tracing
from factory.base import FactoryBase, Lease
from factory.config import VMConfig
from factory.errors import FactoryError
from factory.ownership import OwnerKind
from factory.vm import VM, VMStatus

# Retry a failing base after 1 s, doubling to at most 30 s: a broken config
# should not spin QEMU starts, a transient failure should heal soon.
RETRY_INITIAL_S = 1.0
RETRY_MAX_S = 30.0
# How often ready VMs are checked for a dead QEMU.
WATCH_INTERVAL_S = 1.0
# A caller waits at most this long for a ready VM (TCG boots take seconds).
GET_TIMEOUT_S = 120.0
# A VM handed to another process (VMCache's GetBaseVM) is set up there next: QMP and agent
# connects, resume, handoff, ~15 ms under TCG. Refilling its slot at once (a QEMU start and a
# device-state load, tens of ms of CPU) competes with that on 2 cores, so the refill waits this
# long, unless a caller is waiting for a VM: then it starts at once.
HANDOUT_REFILL_DELAY_S = 0.03

_TRACER = "kata_vmfactory.factory"
log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Slot:
    """One worker's VM: ready (vm set), being built, or failing."""
    index: int
    vm: VM | None = None
    taken: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    failures: int = 0
    last_error: str = ""
    ready_at: float = 0.0


class SlotState(enum.Enum):
    BUILDING = "building"  # a VM is being made (or the slot waits for its refill)
    READY = "ready"
    FAILING = "failing"  # the last build failed; retrying with backoff


@dataclasses.dataclass(frozen=True)
class SlotSnapshot:
    """One slot as status shows it."""
    index: int
    state: SlotState
    vm_id: str
    pid: int
    failures: int  # in a row
    last_error: str


class CacheFactory(FactoryBase):
    def __init__(self, base: FactoryBase, count: int, get_timeout_s: float = GET_TIMEOUT_S,
                 on_ready: Callable[[int, VM, float], None] | None = None, park_disconnected: bool = False,
                 on_failure: Callable[[int, BaseException], None] | None = None) -> None:
        if count < 1:
            raise ValueError(f"cache size must be at least 1, got {count}")
        self.base = base
        self.count = count
        self.get_timeout_s = get_timeout_s
        self._on_ready = on_ready  # progress callback(slot_index, vm, seconds)
        self._on_failure = on_failure  # callback(slot_index, exception) after a failed build
        # The VMCache server hands VMs to other processes, which connect QMP
        # and the agent themselves: letting go when parking keeps ~1 ms of
        # socket teardown off GetBaseVM.
        self._park_disconnected = park_disconnected
        self._slots = [_Slot(i) for i in range(count)]
        self._ready: asyncio.Queue[_Slot] = asyncio.Queue()
        self._closed = False
        self._waiting = 0  # callers blocked in take()
        self._deferred_refills: dict[int, asyncio.TimerHandle] = {}  # slot index -> its held-back refill
        self._tasks = [asyncio.ensure_future(self._worker(slot)) for slot in self._slots]
        self._tasks.append(asyncio.ensure_future(self._watch()))

    def config(self) -> VMConfig:
        return self.base.config()

    async def _worker(self, slot: _Slot) -> None:
        ownership.act_as(OwnerKind.POOL)  # this task's own context: only its VMs
        delay = RETRY_INITIAL_S
        while not self._closed:
            started = time.monotonic()
            try:
                vm = await self.base.get_base_vm(self.base.config())
                # Warming pays off only for a VM that will wait in the pool;
                # one a caller is already waiting for would pay it twice.
                if not self._waiting:
                    await self._warm(vm)
                if self._park_disconnected:
                    await vm.disconnect()
                await self._prepare_owner_record(vm)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # keep serving: show it, back off, retry
                slot.failures += 1
                slot.last_error = str(err)
                if self._on_failure:
                    self._on_failure(slot.index, err)
                log.error("cache slot %d: building a VM failed (%d in a row), retrying in %.0f s: %s",
                          slot.index, slot.failures, delay, err)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            delay = RETRY_INITIAL_S
            slot.failures, slot.last_error = 0, ""
            slot.vm, slot.ready_at = vm, time.monotonic()
            slot.taken.clear()
            if self._on_ready:
                self._on_ready(slot.index, vm, slot.ready_at - started)
            await self._ready.put(slot)
            await slot.taken.wait()

    @staticmethod
    async def _warm(vm: VM) -> None:
        """Runs a fresh clone once before parking it.

        Under TCG a clone's first ~150 ms after `cont` go to an empty
        translation cache and the agent's reconnect; paying that here, not
        at hand-out, is most of a cached get_vm (measured 148 ms → 17 ms).
        The hand-out still reseeds and sets the clock. The guest also
        mounts the VM's share now: under TCG that mount is ~90 ms of a
        container's create, here off its path (the VM is never migrated
        after this, which a mounted 9p export would block).
        """
        try:
            await vm.resume_for_owner()
            await vm.mount_share()
            await vm.pause()
        except BaseException:
            await vm.stop()
            raise

    @staticmethod
    async def _prepare_owner_record(vm: VM) -> None:
        """Readies the owner record the hand-out writes, so that write is a cheap rename (it is
        on GetBaseVM's path before the reply); without it the write just costs more."""
        try:
            await asyncio.to_thread(vm.hypervisor.prepare_owner_record)
        except OSError as err:
            log.warning("VM %s: cannot prepare its owner record: %s", vm.id, err)
        except BaseException:
            await vm.stop()  # cancelled (close()) before the VM reached its slot: nobody else would
            raise

    async def _watch(self) -> None:
        while not self._closed:
            await asyncio.sleep(WATCH_INTERVAL_S)
            for slot in self._slots:
                vm = slot.vm
                if vm is not None and not vm.hypervisor.is_alive():
                    await self._drop_dead(slot)

    async def _drop_dead(self, slot: _Slot) -> None:
        vm, slot.vm = slot.vm, None
        if vm is None:
            return
        log.warning("cache slot %d: VM %s died (QEMU pid %d gone); replacing it",
                    slot.index, vm.id, vm.hypervisor.state.pid)
        slot.last_error = f"VM {vm.id} died while cached"
        await vm.stop()
        slot.taken.set()  # the worker builds a new one

    async def get_base_vm(self, config: VMConfig, ctx: Context | None = None) -> VM:
        lease = await self.take_base_vm(config, ctx)
        lease.commit()
        return lease.vm

    async def take_base_vm(self, config: VMConfig, ctx: Context | None = None) -> Lease:
        lease = await self.take(ctx)
        try:
            # Out of the pool: the caller's now, as whatever it acts as.
            lease.vm.hypervisor.record_owner(ownership.current())
        except BaseException:
            await lease.give_back()
            raise
        return lease

    async def lease(self, ctx: Context | None = None) -> Lease:
        slot, vm = await self._take(ctx)
        return Lease(vm, lambda: self._refill_after_handout(slot))

    async def take(self, ctx: Context | None = None) -> Lease:
        """A ready VM on lease: the taker commits it (handed over) or gives it back (not used).

        Either way its slot refills, but only then: starting a QEMU blocks the event loop for
        milliseconds, so the VMCache server ends the lease once its reply has gone out (GetBaseVM
        p50 3.5 ms with the refill first, ~1.3 ms after).
        """
        slot, vm = await self._take(ctx)
        return Lease(vm, slot.taken.set)

    async def _take(self, ctx: Context | None) -> tuple[_Slot, VM]:
        with tracing.span(_TRACER, "cache.GetBaseVM", ctx, subsystem="factory"):
            deadline = time.monotonic() + self.get_timeout_s
            while True:
                if self._closed:
                    raise FactoryError("cache factory is closed")
                try:
                    # A ready VM is taken without a wait_for task: one event-loop turn less.
                    slot = self._ready.get_nowait()
                except asyncio.QueueEmpty:
                    slot = await self._wait_ready(deadline)
                vm, slot.vm = slot.vm, None
                if vm is None:
                    continue  # dropped by the watcher after it was queued
                if vm.hypervisor.is_alive():
                    return slot, vm
                slot.taken.set()
                log.warning("cache slot %d: VM %s died before hand-out; taking another", slot.index, vm.id)
                await vm.stop()

    async def _wait_ready(self, deadline: float) -> _Slot:
        self._waiting += 1
        try:
            self._refill_deferred_now()  # a caller waits: no refill may be held back for anyone
            return await asyncio.wait_for(self._ready.get(), max(deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            raise FactoryError(self._timeout_message()) from None
        finally:
            self._waiting -= 1

    def _refill_after_handout(self, slot: _Slot) -> None:
        """Refills a slot whose VM went to another process: after HANDOUT_REFILL_DELAY_S, or at
        once when a caller is already waiting for a VM."""
        if self._waiting or self._closed:
            slot.taken.set()
            return
        self._deferred_refills[slot.index] = asyncio.get_running_loop().call_later(
            HANDOUT_REFILL_DELAY_S, self._refill_now, slot)

    def _refill_now(self, slot: _Slot) -> None:
        handle = self._deferred_refills.pop(slot.index, None)
        if handle is not None:
            handle.cancel()
        slot.taken.set()

    def _refill_deferred_now(self) -> None:
        for slot in [s for s in self._slots if s.index in self._deferred_refills]:
            self._refill_now(slot)

    def _timeout_message(self) -> str:
        failing = [f"slot {s.index}: {s.last_error}" for s in self._slots if s.last_error]
        why = ("; failing: " + "; ".join(failing)) if failing else "; all VMs are still booting or taken"
        return f"no cached VM became ready within {self.get_timeout_s:.0f} s{why}"

    def status(self) -> list[VMStatus]:
        return [s.vm.status() for s in self._slots if s.vm is not None]

    def slots(self) -> list[SlotSnapshot]:
        snapshots = []
        for s in self._slots:
            vm = s.vm
            state = SlotState.READY if vm else SlotState.FAILING if s.failures else SlotState.BUILDING
            snapshots.append(SlotSnapshot(s.index, state, vm.id if vm else "",
                                          vm.hypervisor.state.pid if vm else 0, s.failures, s.last_error))
        return snapshots

    def details(self) -> dict[str, Any]:
        return {
            "strategy": "cache",
            "size": self.count,
            "ready": sum(1 for s in self._slots if s.vm is not None),
            "errors": [{"slot": s.index, "failures": s.failures, "error": s.last_error}
                       for s in self._slots if s.last_error],
            "base": self.base.details(),
        }

    async def close(self, ctx: Context | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in self._deferred_refills.values():
            handle.cancel()
        self._deferred_refills.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        vms = [s.vm for s in self._slots if s.vm is not None]
        for slot in self._slots:
            slot.vm = None
        await asyncio.gather(*(vm.stop() for vm in vms), return_exceptions=True)
        await self.base.close(ctx)
