"""Finds and removes orphaned VMs: run directories whose recorded owner is dead.

Run at VMCache server start-up, by `kata-runtime factory gc` and `destroy`,
and before a template is (re)made. A VM whose owner is alive is never
touched; a directory with no owner record (the template's tmpfs, another
program's files) is left alone too.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Collection

from factory import ownership
from factory.errors import FactoryError
from factory.hypervisor.qemu import STOP_GRACE_S
from factory.hypervisor.rundir import RunDir
from factory.ownership import Owner, OwnerKind
from hostos import mountinfo, mounts, process

# A launcher killed between creating a run directory and recording its owner
# (microseconds apart) leaves it with nothing but an empty share; older than
# this, nobody is about to fill it.
ABANDONED_AFTER_S = 60.0

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Reaped:
    vm_id: str
    owner: Owner
    qemu_pid: int  # 0 when no QEMU was running any more

    def describe(self) -> str:
        whose = f"{self.owner.kind.value} owner pid {self.owner.pid}"
        if self.owner.container_id:
            whose += f" (container {self.owner.container_id})"
        qemu = f"QEMU pid {self.qemu_pid} stopped" if self.qemu_pid else "no QEMU left"
        return f"VM {self.vm_id}: {whose} is gone; {qemu}, run directory removed"


def _run_dirs(run_root: str) -> list[Path]:
    try:
        return [e for e in sorted(Path(run_root).iterdir()) if e.is_dir() and not e.is_symlink()]
    except FileNotFoundError:
        return []


def orphans(run_root: str, kinds: Collection[OwnerKind] | None = None) -> list[tuple[RunDir, Owner]]:
    """Run directories under `run_root` whose recorded owner is dead."""
    found = []
    for entry in _run_dirs(run_root):
        owner = ownership.read(entry)
        if owner is None or owner.is_alive() or (kinds is not None and owner.kind not in kinds):
            continue
        found.append((RunDir(Path(run_root), entry.name), owner))
    return found


def _remove_if_abandoned(entry: Path) -> bool:
    """Removes an ownerless run directory: its creator died between mkdir and the owner record
    (RunDir.create writes that first), so it is empty."""
    try:
        if os.listdir(entry) != []:
            return False
        if time.time() - entry.stat().st_mtime < ABANDONED_AFTER_S:
            return False
        # rmdir, never rmtree: anything that appeared meanwhile stays.
        os.rmdir(entry)
    except OSError:
        return False
    log.warning("removed abandoned run directory %s (no owner, no VM)", entry)
    return True


def _qemu_identity(run: RunDir) -> tuple[int, int] | None:
    """QEMU's (pid, start time): recorded once it answered, else from its pidfile."""
    try:
        state = json.loads(run.state_file.read_text())
        return int(state["pid"]), int(state["pid_start_time"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        pid = int(run.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    # Killed between QEMU writing its pidfile and the launcher recording its
    # start time: only a process started for this run directory is QEMU.
    if pid not in process.pids_mentioning(str(run.path) + "/"):
        return None
    started = process.start_time(pid)
    return (pid, started) if started is not None else None


def reap_one(run: RunDir, owner: Owner) -> Reaped:
    """Stops the VM in `run` (by recorded pid and start time) and removes its directory."""
    identity = _qemu_identity(run)
    stopped = 0
    if identity is not None and process.is_alive(*identity):
        process.terminate(identity[0], identity[1], STOP_GRACE_S)
        stopped = identity[0]
    # A QEMU (or its launcher) that never got as far as a pidfile.
    process.kill_mentioning(str(run.path) + "/", STOP_GRACE_S)
    # A container's rootfs is bind-mounted below the share: deleting through
    # a live bind mount would delete the user's files.
    # Each by the mount ID it has now, never by a path a guest could have moved something onto.
    for mount in mountinfo.mounts_below(str(run.path)):
        try:
            mounts.unmount_recorded(mount.mount_point, mount.mount_id)
        except OSError as err:  # run.remove() then refuses to cross it: the host loses nothing
            log.error("cannot unmount %s of orphan %s: %s", mount.mount_point, run.vm_id, err)
    run.remove()
    reaped = Reaped(run.vm_id, owner, stopped)
    log.warning("reaped orphan %s", reaped.describe())
    return reaped


def reap(run_root: str, kinds: Collection[OwnerKind] | None = None, container_id: str | None = None) -> list[Reaped]:
    """Reaps every orphan under `run_root` (of `kinds`, or all; of one container's, if given);
    returns what it did."""
    reaped = []
    for run, owner in orphans(run_root, kinds):
        if container_id is not None and owner.container_id != container_id:
            continue
        try:
            reaped.append(reap_one(run, owner))
        except (OSError, FactoryError) as err:  # one stuck directory must not stop the rest
            log.error("cannot reap orphan VM %s in %s: %s", run.vm_id, run.path, err)
    for entry in _run_dirs(run_root):
        if ownership.read(entry) is None:
            _remove_if_abandoned(entry)
    return reaped
