"""The host side of a container's share: its rootfs bound into the VM's 9p export, and undone.

The runtime reaches it through VM.share_rootfs; unbind_rootfs works from what the state recorded.

The export (RunDir.shared_dir) is a read-only bind of a host-only directory, so the guest can
neither rename nor replace anything the host mounted there; the rootfs bind is the only writable
part. The host records the bind's mount ID and teardown unmounts exactly that mount, so nothing
the guest writes (symlinks, renamed directories) steers what the host unmounts or removes.
"""
from __future__ import annotations

import dataclasses
import logging

from factory.hypervisor.cmdline import SHARED_FS_TAG
from factory.hypervisor.rundir import RunDir
from hostos import mounts

log = logging.getLogger(__name__)

# Where the guest mounts the VM's 9p share (tag SHARED_FS_TAG); container rootfs are below it.
GUEST_SHARED_DIR = "/run/kata-containers/shared"
__all__ = ["GUEST_SHARED_DIR", "SHARED_FS_TAG", "RootfsShare", "bind_rootfs", "unbind_rootfs"]


@dataclasses.dataclass(frozen=True)
class RootfsShare:
    mount_point: str  # host path, inside the VM's read-only export
    mount_id: int  # from /proc/self/mountinfo when the host mounted it
    guest_path: str  # the same rootfs as the guest sees it




def bind_rootfs(run: RunDir, container_id: str, rootfs: str, readonly: bool) -> RootfsShare:
    """Binds the bundle's rootfs into the VM's share, nosuid,nodev (what a guest plants there is
    inert on the host). The caller's container_id is already checked (StateStore.check_id)."""
    (run.shared_writable_dir / container_id / "rootfs").mkdir(mode=0o755, parents=True)
    target = str(run.shared_dir / container_id / "rootfs")
    mount_id = mounts.bind_recorded(rootfs, target, readonly=readonly, nosuid_nodev=True)
    return RootfsShare(mount_point=target, mount_id=mount_id, guest_path=f"{GUEST_SHARED_DIR}/{container_id}/rootfs")


def unbind_rootfs(mount_point: str, mount_id: int) -> None:
    """Unmounts the recorded rootfs bind if it is still there. Never raises: a bind left behind
    (recorded wrongly, or covered) goes when the VM's run directory is removed, which detaches the
    whole export with everything below it."""
    if not mount_point or mount_id <= 0:
        return
    try:
        mounts.unmount_recorded(mount_point, mount_id)
    except OSError as err:
        log.warning("%s", err)
