"""Reading /proc/self/mountinfo: which mount is at a path, which mount an open fd is on.

Mount IDs are what the host records when it mounts, so that teardown unmounts exactly that mount
and never whatever a guest later put at the same path.
"""
from __future__ import annotations

import dataclasses
import os
import re

# mountinfo escapes space, tab, newline and backslash in paths as \ooo octal.
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclasses.dataclass(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    root: str  # the directory of the source filesystem this mount shows
    mount_point: str
    fstype: str
    source: str
    options: str


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> list[Mount]:
    """This process's mount table, parents before children, in mount order."""
    table = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            # Optional fields end with "-"; fstype is the one after it.
            dash = fields.index("-", 6)
            table.append(Mount(mount_id=int(fields[0]), parent_id=int(fields[1]), root=_unescape(fields[3]),
                               mount_point=_unescape(fields[4]), fstype=fields[dash + 1],
                               source=_unescape(fields[dash + 2]), options=fields[5]))
    return table


def by_id(mount_id: int) -> Mount | None:
    return next((m for m in mounts() if m.mount_id == mount_id), None)


def top_mount_at(path: str) -> Mount | None:
    """The mount a lookup of `path` lands on when something is mounted exactly there (the last one
    stacked), else None. `path` must be absolute and normalised (mountinfo paths are)."""
    found = None
    for entry in mounts():
        if entry.mount_point == path:
            found = entry
    return found


def mounts_below(path: str) -> list[Mount]:
    """Mounts at or below `path` (absolute, normalised), deepest first: the order to unmount them."""
    root = path.rstrip("/")
    found = [m for m in mounts() if m.mount_point == root or m.mount_point.startswith(root + "/")]
    return sorted(found, key=lambda m: m.mount_point.count("/"), reverse=True)


def fd_mount_id(fd: int) -> int:
    """The ID of the mount an open file lives on (fdinfo's mnt_id, Linux >= 3.15): unlike st_dev it
    tells two bind mounts of one filesystem apart."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/fdinfo/{fd} has no mnt_id; this kernel is too old (needs Linux 3.15 or later)")


def path_mount_id(path: str) -> int:
    """The mount `path` itself is on, without following a final symlink."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return fd_mount_id(fd)
    finally:
        os.close(fd)
