"""One QEMU VM: launch (direct, template, clone), pause, resume, save, hotplug, stop, re-attach.

The VM's facts live in its run directory's hypervisor.json, so any process
can re-attach it by id (VMCache hands paused VMs to other processes).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from opentelemetry.context import Context

from factory import ownership, tracing
from factory.config import HypervisorConfig
from factory.errors import BootError, HypervisorError, HypervisorTimeoutError
from factory.hypervisor import accelerator, cmdline
from factory.hypervisor.qmp import QMP, fd_from_path
from factory.hypervisor.rundir import DEFAULT_RUN_ROOT, RunDir, tail
from hostos import files, process

# QEMU's launcher process returns once the daemon is initialised (~50 ms);
# a loaded 2-core host running several TCG guests can take seconds.
LAUNCH_TIMEOUT_S = 30.0
QMP_CONNECT_TIMEOUT_S = 10.0
# Template save and clone load move only device state (a few hundred KB with
# x-ignore-shared): tens of milliseconds normally.
MIGRATION_TIMEOUT_S = 30.0
MIGRATION_POLL_S = 0.002
# How long QEMU gets to exit after `quit` or SIGTERM before SIGKILL.
STOP_GRACE_S = 3.0
MIB = 1024 * 1024

_TRACER = "kata_vmfactory.hypervisor"
log = logging.getLogger(__name__)


@dataclasses.dataclass
class QemuState:
    """Everything another process needs to drive this VM (GrpcVM.hypervisor)."""
    id: str
    run_root: str
    pid: int
    pid_start_time: int
    accelerator: str
    num_vcpus: int
    max_vcpus: int
    memory_mib: int  # boot memory plus hot-plugged DIMMs
    max_memory_mib: int
    memory_slots: int
    boot_from_template: bool = False
    hotplugged_cpus: list[str] = dataclasses.field(default_factory=list)
    hotplugged_memory: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QemuState":
        return cls(**data)


class Qemu:
    def __init__(self, state: QemuState, qmp: QMP | None = None) -> None:
        self.state = state
        self.run = RunDir(Path(state.run_root), state.id)
        self._qmp = qmp

    # ---- lifecycle -------------------------------------------------------

    @classmethod
    async def launch(cls, cfg: HypervisorConfig, vm_id: str, run_root: str = DEFAULT_RUN_ROOT,
                     ctx: Context | None = None) -> "Qemu":
        """Starts QEMU for a valid() config; a clone comes back paused with its state loaded."""
        with tracing.span(_TRACER, "hypervisor.StartVM", ctx, subsystem="hypervisor", type="qemu",
                          vm_id=vm_id, from_template=cfg.boot_from_template) as span_ctx:
            cfg.check_files()
            accel = accelerator.choose(cfg.accelerator, cfg.qemu_path)
            run = RunDir(Path(run_root), vm_id)
            # The owner goes on record before the share is mounted and QEMU exists: whoever
            # finds this directory later can tell whether its owner is still there to stop it.
            owner = ownership.current()
            run.create(record_owner=lambda path: ownership.write(path, owner))
            vm: Qemu | None = None
            try:
                pid, started = await _daemonize(cmdline.build(cfg, accel, run, vm_id), run)
                state = QemuState(
                    id=vm_id, run_root=str(run_root), pid=pid, pid_start_time=started,
                    accelerator=accel.name, num_vcpus=cfg.num_vcpus, max_vcpus=cfg.max_vcpus,
                    memory_mib=cfg.memory_mib, max_memory_mib=cfg.max_memory_mib,
                    memory_slots=cfg.memory_slots, boot_from_template=cfg.boot_from_template)
                vm = cls(state)
                await vm._connect(span_ctx)
                if cfg.boot_from_template:
                    await vm._load_state(cfg.devices_state_path, span_ctx)
                vm._save_state()
                return vm
            except BaseException as err:
                detail = _boot_detail(run)
                if vm is not None:
                    await vm.stop()
                else:
                    # Failed or cancelled before the pid was known: QEMU may
                    # still have started; find it by its run directory.
                    await asyncio.to_thread(process.kill_mentioning, str(run.path) + "/", STOP_GRACE_S)
                run.remove()
                if isinstance(err, HypervisorError) and detail:
                    raise BootError(f"{err}\n{detail}") from err
                raise

    @classmethod
    async def attach(cls, vm_id: str, run_root: str = DEFAULT_RUN_ROOT, ctx: Context | None = None,
                     timeout_s: float = QMP_CONNECT_TIMEOUT_S) -> "Qemu":
        """Takes over a running VM another process started (its QMP client must be gone)."""
        with tracing.span(_TRACER, "hypervisor.Attach", ctx, subsystem="hypervisor", vm_id=vm_id) as span_ctx:
            run = RunDir(Path(run_root), vm_id)
            try:
                state = QemuState.from_dict(json.loads(run.state_file.read_text()))
            except (OSError, ValueError, TypeError) as err:
                raise HypervisorError(f"cannot re-attach VM {vm_id}: {run.state_file} unreadable: {err}") from err
            return await cls.from_state(state, span_ctx, timeout_s)

    @classmethod
    async def from_state(cls, state: QemuState, ctx: Context | None = None,
                         timeout_s: float = QMP_CONNECT_TIMEOUT_S) -> "Qemu":
        vm = cls(state)
        if not vm.is_alive():
            raise HypervisorError(f"VM {state.id}: QEMU pid {state.pid} is not running")
        await vm._connect(ctx, timeout_s)
        return vm

    def is_alive(self) -> bool:
        return process.is_alive(self.state.pid, self.state.pid_start_time)

    def record_owner(self, owner: ownership.Owner) -> None:
        """Puts `owner` on record as this VM's owner (on hand-over), replacing the previous one atomically."""
        try:
            ownership.write(self.run.path, owner)
        except OSError as err:
            raise HypervisorError(f"VM {self.state.id}: cannot record its owner in {self.run.path}: {err}") from err

    def prepare_owner_record(self) -> None:
        """Readies the next record_owner() to be one cheap rename (ownership.prepare); OSError if not."""
        ownership.prepare(self.run.path)

    async def disconnect(self) -> None:
        """Releases the QMP socket so another process can take the VM."""
        if self._qmp is not None:
            qmp, self._qmp = self._qmp, None
            await qmp.close()

    async def stop(self, ctx: Context | None = None) -> None:
        """Ends QEMU (quit, then signals) and removes the run directory. Idempotent."""
        with tracing.span(_TRACER, "hypervisor.StopVM", ctx, subsystem="hypervisor", vm_id=self.state.id):
            gone = not self.is_alive()
            if self._qmp is not None and not gone:
                try:
                    await self._qmp.execute("quit", timeout_s=STOP_GRACE_S)
                    gone = await asyncio.to_thread(process.wait_gone, self.state.pid, self.state.pid_start_time,
                                                   STOP_GRACE_S)
                except HypervisorError:
                    pass  # signals below do the job
            await self.disconnect()
            if not gone:
                gone = await asyncio.to_thread(process.terminate, self.state.pid, self.state.pid_start_time,
                                               STOP_GRACE_S)
            self.run.remove()
            if not gone:
                raise HypervisorError(f"VM {self.state.id}: QEMU pid {self.state.pid} survived SIGKILL")

    # ---- run state -------------------------------------------------------

    async def pause(self, ctx: Context | None = None) -> None:
        with tracing.span(_TRACER, "hypervisor.PauseVM", ctx, subsystem="hypervisor", vm_id=self.state.id):
            await self._qmp_or_fail().execute("stop")

    async def resume(self, ctx: Context | None = None) -> None:
        with tracing.span(_TRACER, "hypervisor.ResumeVM", ctx, subsystem="hypervisor", vm_id=self.state.id):
            await self._qmp_or_fail().execute("cont")

    async def run_status(self) -> str:
        return str((await self._qmp_or_fail().execute("query-status"))["status"])

    async def save_template(self, state_path: str, ctx: Context | None = None) -> None:
        """Writes the paused VM's device state (not its RAM: that is the shared file)."""
        with tracing.span(_TRACER, "hypervisor.SaveVM", ctx, subsystem="hypervisor", vm_id=self.state.id):
            # fd: rather than exec:, which QEMU 7.2 runs through /bin/sh.
            await _migrate_through_fd(self._qmp_or_fail(), state_path, "migrate",
                                      f"saving VM {self.state.id} to {state_path}")

    async def _load_state(self, state_path: str, ctx: Context | None) -> None:
        with tracing.span(_TRACER, "hypervisor.LoadState", ctx, subsystem="hypervisor", vm_id=self.state.id):
            await _migrate_through_fd(self._qmp_or_fail(), state_path, "migrate-incoming",
                                      f"loading VM {self.state.id} from {state_path}")

    # ---- hotplug -----------------------------------------------------------

    async def hotplug_cpus(self, count: int, ctx: Context | None = None) -> int:
        """Adds up to `count` vCPUs (bounded by max_vcpus); returns how many were added.

        They arrive offline: the guest agent onlines them.
        """
        with tracing.span(_TRACER, "hypervisor.HotplugCPUs", ctx, subsystem="hypervisor",
                          vm_id=self.state.id, count=count):
            qmp = self._qmp_or_fail()
            slots = [s for s in await qmp.execute("query-hotpluggable-cpus") if "qom-path" not in s]
            if count > len(slots):
                log.warning("VM %s: %d vCPUs requested, only %d free (max_vcpus %d)",
                            self.state.id, count, len(slots), self.state.max_vcpus)
            # Lowest ids first, so the guest numbers CPUs in order.
            slots.sort(key=lambda s: tuple(sorted(s["props"].items())))
            added = 0
            for slot in slots[:count]:
                props = slot["props"]
                dev_id = "cpu-" + "-".join(str(props[k]) for k in sorted(props))
                await qmp.execute("device_add", {"driver": slot["type"], "id": dev_id, **props})
                self.state.hotplugged_cpus.append(dev_id)
                self.state.num_vcpus += 1
                added += 1
            self._save_state()
            return added

    async def hotplug_memory(self, size_mib: int, ctx: Context | None = None) -> None:
        """Adds one DIMM of `size_mib`; it arrives offline and the agent onlines it."""
        with tracing.span(_TRACER, "hypervisor.HotplugMemory", ctx, subsystem="hypervisor",
                          vm_id=self.state.id, size_mib=size_mib):
            if size_mib <= 0:
                raise ValueError(f"memory hotplug size must be positive, got {size_mib} MiB")
            if len(self.state.hotplugged_memory) >= self.state.memory_slots:
                raise HypervisorError(f"VM {self.state.id}: all {self.state.memory_slots} memory slots are used")
            if self.state.memory_mib + size_mib > self.state.max_memory_mib:
                raise HypervisorError(
                    f"VM {self.state.id}: {self.state.memory_mib} + {size_mib} MiB exceeds max_memory_mib "
                    f"{self.state.max_memory_mib}")
            qmp = self._qmp_or_fail()
            slot = len(self.state.hotplugged_memory) + 1
            backend, dimm = f"hpmem{slot}", f"dimm{slot}"
            await qmp.execute("object-add", {"qom-type": "memory-backend-ram", "id": backend, "size": size_mib * MIB})
            try:
                await qmp.execute("device_add", {"driver": "pc-dimm", "id": dimm, "memdev": backend})
            except HypervisorError:
                await qmp.execute("object-del", {"id": backend})
                raise
            self.state.hotplugged_memory.append({"id": dimm, "size_mib": size_mib})
            self.state.memory_mib += size_mib
            self._save_state()

    # ---- internals -------------------------------------------------------

    def _qmp_or_fail(self) -> QMP:
        if self._qmp is None:
            raise HypervisorError(f"VM {self.state.id}: not connected to QMP (disconnected or handed over)")
        return self._qmp

    async def _connect(self, ctx: Context | None, timeout_s: float = QMP_CONNECT_TIMEOUT_S) -> None:
        qmp = QMP(str(self.run.qmp_socket), f"vm-{self.state.id[:8]}")
        await qmp.connect(timeout_s, alive=self.is_alive)
        self._qmp = qmp

    def _save_state(self) -> None:
        # Atomic: a reader never sees half a file.
        files.write_atomic(str(self.run.state_file), json.dumps(self.state.to_dict(), sort_keys=True).encode(),
                           mode=0o600)


async def _daemonize(cmd: list[str], run: RunDir) -> tuple[int, int]:
    """Runs QEMU with -daemonize; returns the daemon's (pid, start time)."""
    log_fd = os.open(run.qemu_log, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(log_fd, "wb") as log_file:
        launcher = await asyncio.create_subprocess_exec(
            *cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        code = await asyncio.wait_for(launcher.wait(), LAUNCH_TIMEOUT_S)
    except BaseException as err:  # timeout or cancellation: never leave the launcher
        if launcher.returncode is None:
            launcher.kill()
            await asyncio.shield(launcher.wait())
        if isinstance(err, asyncio.TimeoutError):
            raise HypervisorTimeoutError(f"QEMU did not finish starting within {LAUNCH_TIMEOUT_S:.0f} s: "
                                         f"{' '.join(cmd)}") from None
        raise
    if code != 0:
        raise HypervisorError(f"QEMU exited with status {code} while starting: {' '.join(cmd)}")
    try:
        pid = int(run.pidfile.read_text().strip())
    except (OSError, ValueError) as err:
        raise HypervisorError(f"QEMU started but its pidfile {run.pidfile} is unreadable: {err}") from err
    started = process.start_time(pid)
    if started is None:
        raise HypervisorError(f"QEMU (pid {pid}) exited right after starting")
    return pid, started


async def _migrate_through_fd(qmp: QMP, state_path: str, command: str, what: str) -> None:
    """Device state to (`migrate`) or from (`migrate-incoming`) a file, handed over by fd."""
    # x-ignore-shared: RAM stays in the shared file; on the destination it
    # must be set before the stream is read.
    await qmp.execute("migrate-set-capabilities",
                      {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
    # A fresh fd each time: QEMU reads from the fd's current offset.
    fd = fd_from_path(state_path, write=command == "migrate")
    try:
        await qmp.pass_fd(fd, "migstate")
    finally:
        os.close(fd)  # QEMU holds its own copy now
    await qmp.execute(command, {"uri": "fd:migstate"})
    await _wait_migration(qmp, what)


async def _wait_migration(qmp: QMP, what: str) -> None:
    deadline = time.monotonic() + MIGRATION_TIMEOUT_S
    while True:
        info = await qmp.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise HypervisorError(f"{what}: migration {status}: {info.get('error-desc', 'no detail from QEMU')}")
        if time.monotonic() > deadline:
            raise HypervisorTimeoutError(f"{what}: migration still {status!r} after {MIGRATION_TIMEOUT_S:.0f} s")
        await asyncio.sleep(MIGRATION_POLL_S)


def _boot_detail(run: RunDir) -> str:
    parts = []
    qemu_tail = tail(run.qemu_log)
    if qemu_tail:
        parts.append(f"QEMU said:\n{qemu_tail}")
    console_tail = tail(run.console_log)
    if console_tail:
        parts.append(f"guest console (last lines):\n{console_tail}")
    return "\n".join(parts)
