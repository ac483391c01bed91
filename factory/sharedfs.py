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
from pathlib import PurePosixPath

from factory.errors import FactoryError
from factory.hypervisor.cmdline import SHARED_FS_TAG
from factory.hypervisor.rundir import RunDir
from hostos import mounts

log = logging.getLogger(__name__)

# Where the guest mounts the VM's 9p share (tag SHARED_FS_TAG); container rootfs are below it.
GUEST_SHARED_DIR = "/run/kata-containers/shared"
__all__ = ["GUEST_SHARED_DIR", "SHARED_FS_TAG", "ShareError", "ShareMount", "bind_into_share", "bind_rootfs",
           "unbind"]


class ShareError(FactoryError):
    """A host directory cannot be shared with the VM (a bad path inside the share, a failed bind)."""


@dataclasses.dataclass(frozen=True)
class ShareMount:
    mount_point: str  # host path, inside the VM's read-only export
    mount_id: int  # from /proc/self/mountinfo when the host mounted it
    guest_path: str  # the same directory as the guest sees it


def bind_into_share(run: RunDir, relative: str, source: str, readonly: bool) -> ShareMount:
    """Binds host directory `source` at `relative` below the VM's share, nosuid,nodev (what a guest
    plants there is inert on the host). The mount point is made in the host-only view first."""
    parts = PurePosixPath(relative).parts
    if not parts or PurePosixPath(relative).is_absolute() or any(p in ("", ".", "..") for p in parts):
        raise ShareError(f"share path {relative!r} must be relative, without '.' or '..'")
    target = str(run.shared_dir / relative)
    try:
        (run.shared_writable_dir / relative).mkdir(mode=0o755, parents=True)
        mount_id = mounts.bind_recorded(source, target, readonly=readonly, nosuid_nodev=True)
    except OSError as err:
        raise ShareError(f"cannot share {source} with the VM at {target}: {err}") from err
    return ShareMount(target, mount_id, f"{GUEST_SHARED_DIR}/{relative}")


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
