"""Per-container state under --root: survives each kata-runtime process.

One directory per container (<root>/<id>/) with state.json, written
atomically, and the shim's control socket; beside it <root>/<id>.lock, which
commands that change the container hold, so two of them on one id take turns.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from hostos import files, locks
from runtime.errors import KataRuntimeError

DEFAULT_ROOT = "/run/kata-vmfactory"
# Same rule as runc: ids become directory and file names.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# A command waits for another on the same id at most this long: longer than a create on a loaded
# machine (commands.CREATE_TIMEOUT_S), the longest a holder keeps the lock.
LOCK_TIMEOUT_S = 360.0


class ContainerError(KataRuntimeError):
    """A container id, its state or an operation on it is wrong."""


class Status(enum.StrEnum):
    """A container's OCI status; a str, so state.json and `state` print the plain word."""
    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


# The runtime-spec version `state` reports, as runc does.
OCI_STATE_VERSION = "1.0.2"
# Where `state` keeps the container process's pid in the guest; its "pid" is the host's.
GUEST_PID_ANNOTATION = "io.katacontainers.pid.guest"


@dataclasses.dataclass
class ContainerState:
    id: str
    bundle: str
    status: Status
    guest_pid: int = 0  # the container process's pid in the guest
    created: str = ""
    annotations: dict[str, str] = dataclasses.field(default_factory=dict)
    shim_pid: int = 0
    shim_start_time: int = 0
    # A warm shim's anchor (runtime/warm/anchor.py): the host process engines know as the
    # container's, standing for the shim, which is not their command's child. 0: none (cold).
    anchor_pid: int = 0
    anchor_start_time: int = 0
    vm_run_root: str = ""  # where the shim's VM lives, recorded before it asks for one
    exit_status: int | None = None
    vm: dict[str, Any] = dataclasses.field(default_factory=dict)  # QemuState of the sandbox VM
    share_mount: str = ""  # host bind mount of the rootfs inside the VM's shared dir
    share_mount_id: int = 0  # its mount ID when the shim mounted it: teardown unmounts only that
    guest_rootfs: str = ""  # the rootfs as the guest sees it, below the VM's share
    # Host paths bound into the VM's share for the container's mounts: [mount point, mount ID]
    # each, unmounted by that ID only (runtime/sandbox/hostside.py).
    host_mounts: list[list[Any]] = dataclasses.field(default_factory=list)
    reason: str = ""  # why a container stopped other than by its process exiting (its VM died)
    rootfs: str = ""  # absolute host path of the bundle's root.path

    @property
    def pid(self) -> int:
        """The container's host pid, as runc's state has it: the shim's while the container is
        there to signal, 0 once it has stopped."""
        live = self.status in (Status.CREATED, Status.RUNNING, Status.PAUSED)
        return (self.anchor_pid or self.shim_pid) if live else 0

    def oci(self) -> dict[str, Any]:
        """runc's `state` output (with `reason` when the container stopped other than by exiting)."""
        annotations = dict(self.annotations)
        if self.guest_pid:
            annotations[GUEST_PID_ANNOTATION] = str(self.guest_pid)
        state: dict[str, Any] = {
            "ociVersion": OCI_STATE_VERSION, "id": self.id, "pid": self.pid, "status": self.status,
            "bundle": self.bundle, "rootfs": self.rootfs, "created": self.created, "owner": ""}
        if annotations:
            state["annotations"] = annotations
        if self.reason:
            state["reason"] = self.reason
        return state


class StateStore:
    def __init__(self, root: str = DEFAULT_ROOT) -> None:
        # Absolute: the shim runs in "/", and a relative root would name another directory there.
        self.root = Path(os.path.abspath(root))

    @staticmethod
    def check_id(container_id: str) -> None:
        if not _ID.match(container_id or ""):
            raise ContainerError(f"invalid container id {container_id!r}: use letters, digits, '_', '.', '-' (max 128)")

    def dir(self, container_id: str) -> Path:
        self.check_id(container_id)
        return self.root / container_id

    def shim_socket(self, container_id: str) -> Path:
        return self.dir(container_id) / "shim.sock"

    def lock(self, container_id: str) -> int:
        """An fd holding the container's lock (close it to release); waits for another holder."""
        self.check_id(container_id)
        self.root.mkdir(mode=0o711, parents=True, exist_ok=True)
        path = self.root / f"{container_id}.lock"
        try:
            return locks.acquire(str(path), LOCK_TIMEOUT_S)
        except locks.LockTimeoutError:
            raise ContainerError(f"container {container_id!r} is still locked by another command after "
                                 f"{LOCK_TIMEOUT_S:.0f} s ({path}); retry when it has finished") from None

    def remove_lock(self, container_id: str) -> None:
        """Removes the lock file of a container that is gone; call it holding the lock."""
        locks.remove(str(self.root / f"{container_id}.lock"))

    def reserve(self, container_id: str) -> Path:
        """Creates the container's directory; a duplicate id is refused."""
        path = self.dir(container_id)
        self.root.mkdir(mode=0o711, parents=True, exist_ok=True)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            raise ContainerError(f"container {container_id!r} already exists") from None
        return path

    def save(self, state: ContainerState) -> None:
        path = self.dir(state.id) / "state.json"
        files.write_atomic(str(path), json.dumps(dataclasses.asdict(state), sort_keys=True).encode(), mode=0o600)

    def load(self, container_id: str) -> ContainerState:
        path = self.dir(container_id) / "state.json"
        try:
            recorded = json.loads(path.read_text())
            # Fields of another version of this runtime are left out, not an unreadable state.
            known = {f.name for f in dataclasses.fields(ContainerState)}
            state = ContainerState(**{k: v for k, v in recorded.items() if k in known})
            state.status = Status(state.status)
            return state
        except FileNotFoundError:
            if self.dir(container_id).is_dir():
                # Reserved by a create that has not written state yet (or died).
                return ContainerState(id=container_id, bundle="", status=Status.CREATING)
            raise ContainerError(f"container {container_id!r} does not exist") from None
        except (ValueError, TypeError, AttributeError) as err:
            raise ContainerError(f"state of container {container_id!r} is unreadable ({path}): {err}") from err

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _ID.match(p.name))

    def remove(self, container_id: str) -> None:
        shutil.rmtree(self.dir(container_id), ignore_errors=True)


def now_rfc3339(ns: int | None = None) -> str:
    """RFC 3339 in UTC with nanoseconds, as runc's `state` writes `created`."""
    ns = time.time_ns() if ns is None else ns
    seconds, fraction = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:09d}Z"
