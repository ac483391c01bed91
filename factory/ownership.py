"""Who owns a VM: a typed record in its run directory, written before QEMU starts.

Any later process (a restarted VMCache server, `kata-runtime factory gc`)
reads it to tell an orphan, whose owner is dead, from a VM in use. The owner
is a (pid, start time) pair, so a recycled pid never passes for the owner.

The kind of owner follows the code that starts the VM without threading it
through every call: the pool worker, the template builder and the shim set
it with acting_as() for their task (a ContextVar), and Qemu.launch records
whatever is in effect; the default is the process itself (DIRECT).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import json
import os
from pathlib import Path
from typing import Any, Iterator

from hostos import process

OWNER_FILE = "owner.json"


class OwnerKind(str, enum.Enum):
    POOL = "pool"            # a cache's ready VM (VMCache server or an in-process cache)
    CONTAINER = "container"  # a sandbox's VM, owned by its shim
    TEMPLATE = "template"    # the VM booted to be saved as the template
    DIRECT = "direct"        # a VM a process started (or was handed) for itself


@dataclasses.dataclass(frozen=True)
class Owner:
    kind: OwnerKind
    pid: int
    start_time: int
    container_id: str = ""

    def is_alive(self) -> bool:
        return process.is_alive(self.pid, self.start_time)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "pid": self.pid, "start_time": self.start_time,
                "container_id": self.container_id}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Owner":
        return cls(OwnerKind(data["kind"]), int(data["pid"]), int(data["start_time"]),
                   str(data.get("container_id", "")))


def this_process(kind: OwnerKind, container_id: str = "") -> Owner:
    pid = os.getpid()
    # Our own stat is always readable; 0 would only mean /proc is missing.
    return Owner(kind, pid, process.start_time(pid) or 0, container_id)


_acting_as: contextvars.ContextVar[tuple[OwnerKind, str]] = contextvars.ContextVar(
    "kata_vm_owner_kind", default=(OwnerKind.DIRECT, ""))


@contextlib.contextmanager
def acting_as(kind: OwnerKind, container_id: str = "") -> Iterator[None]:
    """VMs started (or taken over) in this block are recorded as owned by this process as `kind`."""
    token = _acting_as.set((kind, container_id))
    try:
        yield
    finally:
        _acting_as.reset(token)


def act_as(kind: OwnerKind, container_id: str = "") -> None:
    """acting_as() for the rest of the current task (a shim owns its VM for its whole life)."""
    _acting_as.set((kind, container_id))


def current() -> Owner:
    """The owner a VM started here and now gets."""
    kind, container_id = _acting_as.get()
    return this_process(kind, container_id)


def path_in(run_dir: Path) -> Path:
    return run_dir / OWNER_FILE


def write(run_dir: Path, owner: Owner) -> None:
    """Records `owner` atomically: a reader sees the old record or the new one, never half."""
    target = path_in(run_dir)
    tmp = target.with_name(f".{OWNER_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(owner.to_dict(), sort_keys=True))
    tmp.replace(target)


def read(run_dir: Path) -> Owner | None:
    """The recorded owner; None when there is no record or it cannot be read."""
    try:
        return Owner.from_dict(json.loads(path_in(run_dir).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
