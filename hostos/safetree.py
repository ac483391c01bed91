"""Removing a directory tree the way a host must when someone else could have written into it:
through directory fds (openat), never following a symlink, never descending into another mount.

shutil.rmtree already avoids symlinks but walks through mount points, and so deletes the files of
whatever is bind-mounted below (a container's rootfs): here a mount below is left alone and named.
"""
from __future__ import annotations

import errno
import os

from hostos import mountinfo

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class MountInTheWay(OSError):
    """The tree holds a mount point; everything else was removed, the mount and its parents stay."""


def remove_tree(path: str) -> None:
    """Removes `path` (a directory, or a symlink or file itself); missing is fine. Raises
    MountInTheWay naming the first mount point found below, or if `path` is itself a mount point."""
    path = os.path.abspath(path)
    try:
        parent_fd = os.open(os.path.dirname(path), _DIR_FLAGS)
    except FileNotFoundError:
        return
    try:
        name = os.path.basename(path)
        try:
            root_fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            _unlink(parent_fd, name)  # a symlink or file: removes the link, never its target
            return
        try:
            mount_id = mountinfo.fd_mount_id(root_fd)
            if mount_id != mountinfo.fd_mount_id(parent_fd):
                raise MountInTheWay(errno.EBUSY, f"{path} is a mount point; unmount it first")
            kept: list[str] = []
            _empty(root_fd, path, mount_id, kept)
        finally:
            os.close(root_fd)
        if kept:
            raise MountInTheWay(errno.EBUSY, f"not removing {path} entirely: {kept[0]} is a mount point "
                                f"({len(kept)} in all); unmount it (umount -l) and remove again")
        try:
            os.rmdir(name, dir_fd=parent_fd)
        except FileNotFoundError:
            pass
    finally:
        os.close(parent_fd)


def _empty(dir_fd: int, path: str, mount_id: int, kept: list[str]) -> None:
    for entry in list(os.scandir(dir_fd)):
        name = entry.name
        try:
            child_fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            continue
        except OSError as err:
            if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            _unlink(dir_fd, name)
            continue
        try:
            if mountinfo.fd_mount_id(child_fd) != mount_id:
                kept.append(os.path.join(path, name))
                continue
            _empty(child_fd, os.path.join(path, name), mount_id, kept)
        finally:
            os.close(child_fd)
        try:
            os.rmdir(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        except OSError as err:
            # ENOTEMPTY: a mount below was kept; EBUSY: a mount point in this namespace.
            if err.errno not in (errno.ENOTEMPTY, errno.EBUSY):
                raise
            if err.errno == errno.EBUSY:
                kept.append(os.path.join(path, name))


def _unlink(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        pass  # replaced by a directory meanwhile: only possible if someone else writes here
