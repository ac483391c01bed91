"""tmpfs mount and lazy unmount for the template directory (libc, no shell)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

MS_NOSUID = 0x2
MS_NODEV = 0x4
MNT_DETACH = 0x2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def mount_tmpfs(path: str, size_mib: int) -> None:
    options = f"size={size_mib}M,mode=0700".encode()
    if _libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mounting a {size_mib} MiB tmpfs on {path} failed: {os.strerror(err)} (needs root)")


def unmount_lazy(path: str) -> None:
    """MNT_DETACH: a busy mountpoint (someone's cwd) must not leave stacked mounts."""
    if _libc.umount2(path.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unmounting {path} failed: {os.strerror(err)}")


def is_mountpoint(path: str) -> bool:
    return os.path.ismount(path)
