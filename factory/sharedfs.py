"""The host side of a container's share: host directories bound into the VM's 9p export, and undone.

The runtime reaches it through VM.share_rootfs; unbind works from what the state recorded.

The export (RunDir.shared_dir) is a read-only bind of a host-only directory (shared_writable_dir),
so the guest can neither rename nor replace anything the host put there; what the host binds in
(the container's rootfs, read-only host mounts) are the only parts that can be writable. The host
records each bind's mount ID, and teardown unmounts exactly that mount, so nothing the guest writes
(symlinks, renamed directories) steers what the host unmounts or removes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import PurePosixPath

from factory.errors import FactoryError
from factory.hypervisor.cmdline import SHARED_FS_TAG
from factory.hypervisor.rundir import RunDir
from hostos import mounts

log = logging.getLogger(__name__)

# Where the guest mounts the VM's 9p share (tag SHARED_FS_TAG); container rootfs are below it.
GUEST_SHARED_DIR = "/run/kata-containers/shared"
__all__ = ["GUEST_SHARED_DIR", "SHARED_FS_TAG", "ShareError", "ShareMount", "bind_into_share", "bind_rootfs",
           "copy_into_share", "unbind"]


class ShareError(FactoryError):
    """A host directory cannot be shared with the VM (a bad path inside the share, a failed bind)."""


@dataclasses.dataclass(frozen=True)
class ShareMount:
    mount_point: str  # host path, inside the VM's read-only export
    mount_id: int  # from /proc/self/mountinfo when the host mounted it
    guest_path: str  # the same directory as the guest sees it


def _check_relative(relative: str) -> None:
    parts = PurePosixPath(relative).parts
    if not parts or PurePosixPath(relative).is_absolute() or any(p in ("", ".", "..") for p in parts):
        raise ShareError(f"share path {relative!r} must be relative, without '.' or '..'")


def bind_into_share(run: RunDir, relative: str, source: str, readonly: bool) -> ShareMount:
    """Binds host directory or regular file `source` at `relative` below the VM's share,
    nosuid,nodev (what a guest plants there is inert on the host). The mount point is made in the
    host-only view first. `source` may be /proc/self/fd/N of a path the caller opened and checked."""
    _check_relative(relative)
    target = str(run.shared_dir / relative)
    try:
        mount_point = run.shared_writable_dir / relative
        if os.path.isdir(source):
            mount_point.mkdir(mode=0o755, parents=True)
        else:
            mount_point.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.close(os.open(mount_point, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
        mount_id = mounts.bind_recorded(source, target, readonly=readonly, nosuid_nodev=True)
    except OSError as err:
        raise ShareError(f"cannot share {source} with the VM at {target}: {err}") from err
    return ShareMount(target, mount_id, f"{GUEST_SHARED_DIR}/{relative}")


def copy_into_share(run: RunDir, relative: str, source_fd: int) -> str:
    """Copies the regular file open at `source_fd` to `relative` in the host-only view of the
    share; returns the guest's path of the copy, which the guest can read and never write (the
    export is read-only)."""
    _check_relative(relative)
    target = run.shared_writable_dir / relative
    try:
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(out, "wb") as dst, os.fdopen(os.dup(source_fd), "rb") as src:
            src.seek(0)
            shutil.copyfileobj(src, dst)
    except OSError as err:
        raise ShareError(f"cannot copy a file into the VM's share at {target}: {err}") from err
    return f"{GUEST_SHARED_DIR}/{relative}"


def bind_rootfs(run: RunDir, container_id: str, rootfs: str, readonly: bool) -> ShareMount:
    """The bundle's rootfs into the share. `container_id` is already checked (StateStore.check_id)."""
    return bind_into_share(run, f"{container_id}/rootfs", rootfs, readonly)


def unbind(mount_point: str, mount_id: int) -> None:
    """Unmounts the recorded bind if it is still there. Never raises: a bind left behind (recorded
    wrongly, or covered) goes when the VM's run directory is removed, which detaches the whole
    export with everything below it."""
    if not mount_point or mount_id <= 0:
        return
    try:
        mounts.unmount_recorded(mount_point, mount_id)
    except OSError as err:
        log.warning("%s", err)
