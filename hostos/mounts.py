"""Mounts the factory and sandboxes need: template tmpfs, rootfs bind mounts, lazy unmount (libc, no shell)."""
from __future__ import annotations

import ctypes
import os

from hostos import mountinfo

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# The C library already loaded into this process: find_library("c") would run `ldconfig -p`
# (~7 ms) in every command that imports this module.
_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: bytes | None, target: str, fstype: bytes | None, flags: int, data: bytes | None, what: str) -> None:
    if _libc.mount(source, target.encode(), fstype, flags, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what} failed: {os.strerror(err)} (needs root)")


def mount_tmpfs(path: str, size_mib: int, source: str = "tmpfs") -> None:
    """`source` names the mount in /proc/self/mountinfo: a way to tell our mounts from others'."""
    _mount(source.encode(), path, b"tmpfs", MS_NOSUID | MS_NODEV, f"size={size_mib}M,mode=0700".encode(),
           f"mounting a {size_mib} MiB tmpfs on {path}")


def bind(source: str, target: str, readonly: bool) -> None:
    _mount(source.encode(), target, None, MS_BIND | MS_REC, None, f"bind-mounting {source} on {target}")
    if readonly:
        try:
            _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None, f"making {target} read-only")
        except OSError:
            unmount_lazy(target)
            raise


def bind_recorded(source: str, target: str, readonly: bool, nosuid_nodev: bool) -> int:
    """A private bind mount whose ID is returned, for unmount_recorded() to remove exactly it.

    Private: a mount made below it later (a container rootfs in a share) must not propagate to the
    source's peers, where nobody would unmount it. nosuid,nodev: files someone plants through it
    (setuid binaries, device nodes) are inert on the host.
    """
    _mount(source.encode(), target, None, MS_BIND | MS_REC, None, f"bind-mounting {source} on {target}")
    try:
        mount_id = mountinfo.path_mount_id(target)
        _mount(None, target, None, MS_PRIVATE, None, f"making {target} private")
        flags = MS_BIND | MS_REMOUNT | (MS_RDONLY if readonly else 0) | (MS_NOSUID | MS_NODEV if nosuid_nodev else 0)
        if flags != MS_BIND | MS_REMOUNT:
            _mount(None, target, None, flags, None, f"remounting {target} with flags {flags:#x}")
    except OSError:
        unmount_lazy(target)
        raise
    return mount_id


def unmount_recorded(path: str, mount_id: int) -> bool:
    """Unmounts mount `mount_id` if it is still mounted at `path`, never following a symlink there.

    False when it is already gone. Raises when something else is at `path` (the recorded mount was
    moved, or another was stacked on it): then nothing is unmounted.
    """
    entry = mountinfo.by_id(mount_id)
    if entry is None:
        return False
    top = mountinfo.top_mount_at(path)
    if entry.mount_point != path or top is None or top.mount_id != mount_id:
        raise OSError(f"not unmounting {path}: the mount recorded there (ID {mount_id}) is now at "
                      f"{entry.mount_point} or covered by another mount; unmount it by hand")
    if _libc.umount2(path.encode(), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unmounting {path} failed: {os.strerror(err)}")
    return True


def unmount_lazy(path: str) -> None:
    """MNT_DETACH: a busy mountpoint (someone's cwd) must not leave stacked mounts."""
    if _libc.umount2(path.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unmounting {path} failed: {os.strerror(err)}")


def is_mountpoint(path: str) -> bool:
    return os.path.ismount(path)
