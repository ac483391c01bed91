"""Guest mounts: the host's 9p share, and read-only container rootfs.

mount(2) is called through ctypes rather than by running busybox mount: no fork and exec per
mount (milliseconds each under TCG), and the errno comes back as it is. ctypes is imported at
module level on purpose: a template-cloned VM resumes with the agent already running, so only a
direct boot pays the import, never a sandbox creation.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Callable, List, NamedTuple, Optional

from guest.agent.messages import RequestError

# <linux/mount.h>
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384

# cache=mmap, not cache=none: with none the page cache is bypassed except for mmap'd files,
# where 6.1 only allows read-only shared mappings; containers that mmap files writable (sqlite,
# some package managers) need mmap mode. Executables run fine in both. This is what Kata's own
# agent uses for 9p.
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,cache=mmap"

MountFunction = Callable[[Optional[str], str, Optional[str], int, Optional[str]], None]

_libc: Optional[ctypes.CDLL] = None


def mount_syscall(source: Optional[str], target: str, fstype: Optional[str], flags: int, data: Optional[str]) -> None:
    """mount(2); raises OSError with the errno and the target."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
        _libc.mount.restype = ctypes.c_int

    def encode(text: Optional[str]) -> Optional[bytes]:
        return None if text is None else os.fsencode(text)

    if _libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


class MountEntry(NamedTuple):
    mount_point: str
    fstype: str
    source: str
    options: List[str]  # per-mount options (ro/rw, nosuid, ...)


def _unescape(field: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as \ooo octal."""
    if "\\" not in field:
        return field
    out = bytearray()
    raw = os.fsencode(field)
    index = 0
    while index < len(raw):
        if raw[index : index + 1] == b"\\" and raw[index + 1 : index + 4].isdigit():
            out.append(int(raw[index + 1 : index + 4], 8))
            index += 4
        else:
            out.append(raw[index])
            index += 1
    return os.fsdecode(bytes(out))


def read_mountinfo(path: str) -> List[MountEntry]:
    """Entries of /proc/self/mountinfo, in mount order (a later entry covers an earlier one)."""
    entries: List[MountEntry] = []
    with open(path) as f:
        for line in f:
            fields = line.split()
            try:
                separator = fields.index("-", 6)
            except ValueError:
                continue
            entries.append(
                MountEntry(
                    mount_point=_unescape(fields[4]),
                    fstype=fields[separator + 1],
                    source=_unescape(fields[separator + 2]),
                    options=fields[5].split(","),
                )
            )
    return entries


def mount_at(entries: List[MountEntry], mount_point: str) -> Optional[MountEntry]:
    """The topmost mount whose mount point is exactly `mount_point`."""
    found = None
    for entry in entries:
        if entry.mount_point == mount_point:
            found = entry
    return found


def _check_absolute(what: str, path: str) -> str:
    if not path.startswith("/"):
        raise RequestError(f"{what} {path!r} is not an absolute path")
    return os.path.normpath(path)


def mount_9p_share(tag: str, mount_point: str, mountinfo_path: str, mount: MountFunction = mount_syscall) -> bool:
    """Mounts the 9p share `tag` at `mount_point` unless it is mounted there already.

    True if this call mounted it. Something else mounted there is a RequestError.
    """
    if not tag or "," in tag or any(c.isspace() for c in tag):
        raise RequestError(f"tag {tag!r} is not a 9p mount tag (non-empty, no spaces or commas)")
    mount_point = _check_absolute("mount_point", mount_point)
    existing = mount_at(read_mountinfo(mountinfo_path), mount_point)
    if existing is not None:
        if existing.fstype == "9p" and existing.source == tag:
            return False
        raise RequestError(
            f"{mount_point} already has a {existing.fstype} mount of {existing.source!r} on it, "
            f"not the 9p share {tag!r}"
        )
    os.makedirs(mount_point, exist_ok=True)
    try:
        mount(tag, mount_point, "9p", 0, NINEP_OPTIONS)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.ENOENT:  # what v9fs says for a tag no virtio-9p device carries
            hint = f"; does QEMU have -device virtio-9p-pci,mount_tag={tag}?"
        elif exc.errno == errno.ENODEV:  # no 9p filesystem type
            hint = "; is the 9p kernel module loaded (guest/init loads lib/modules/load.list)?"
        raise RequestError(f"mount -t 9p -o {NINEP_OPTIONS} {tag} {mount_point}: {exc.strerror}{hint}") from exc
    return True


def make_read_only(path: str, mountinfo_path: str, mount: MountFunction = mount_syscall) -> bool:
    """Makes `path` a read-only bind mount of itself unless it already is a read-only mount point.

    True if this call changed anything. The guest's / itself is refused: that is the agent's root.
    """
    path = _check_absolute("rootfs", path)
    if path == "/":
        raise RequestError("rootfs_readonly needs a rootfs other than the guest's /")
    existing = mount_at(read_mountinfo(mountinfo_path), path)
    if existing is not None and "ro" in existing.options:
        return False
    # A bind mount takes the flags of its source; only a remount of the bind makes it read-only.
    mount(path, path, None, MS_BIND | MS_REC, None)
    mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)
    return True
