"""The host's side of a container, where container engines reach it: the shim's network namespace,
the OCI hooks, and host paths bind-mounted into the container.

Engines (Docker, nerdctl, Kubernetes through CRI) address a container through the host pid they
are given, the shim's: they configure /proc/<pid>/ns/net (so the shim must not be in the host's
network namespace), run hooks with that pid, and bind host files and directories (resolv.conf,
hosts, volumes) into the container.

Host paths reach the guest through the VM's share (factory/sharedfs.py):
  - a read-only regular file of at most FILE_COPY_MAX_BYTES (resolv.conf, hosts, hostname,
    read-only) is copied into the share's host-only part at create time: the guest never sees the
    host file, and later changes to it do not reach the container;
  - a directory, a writable file (Docker's /etc/hosts, Kubernetes' /dev/termination-log, which
    kubelet reads back) or a larger file is bind-mounted into the share, nosuid,nodev, read-only
    unless the mount asks for rw; its mount ID is recorded in the container's state, and teardown
    unmounts exactly that mount (sharedfs.unbind), so nothing the guest writes there (symlinks,
    renames) steers what the host unmounts or removes.
The source path is the engine's: it is resolved on the host once, at create time (opened, checked,
then shared through its fd), never again.
"""
from __future__ import annotations

import asyncio
import logging
import os
import stat
from typing import Any

from factory import sharedfs
from factory.hypervisor.rundir import RunDir
from hostos import netns
from runtime.oci import hooks as oci_hooks
from runtime.oci.spec import BundleSpec, SpecError, mount_readonly

log = logging.getLogger("kata-shim")

# resolv.conf, hosts and hostname are a few KiB; a larger read-only file is shared, not copied.
FILE_COPY_MAX_BYTES = 1024 * 1024


class HostSide:
    def __init__(self, spec: BundleSpec, container_id: str) -> None:
        self.spec = spec
        self.id = container_id
        self.host_netns: int | None = None  # fd of the namespace the shim started in

    # ---- network namespace ------------------------------------------------------------------

    def enter_network_namespace(self) -> None:
        """The shim into a new network namespace, or the one config.json names. Call it from the
        main thread before the shim starts threads (hostos/netns.py)."""
        try:
            self.host_netns = netns.enter(self.spec.network_namespace)
        except OSError as err:
            raise SpecError(f"linux.namespaces network {self.spec.network_namespace or '(new)'}: {err}") from None
        if self.spec.network_namespace is not None:
            log.info("shim %d in network namespace %s", os.getpid(), netns.current_id())

    # ---- hooks ------------------------------------------------------------------------------

    def state(self, status: str) -> dict[str, Any]:
        """The OCI state hooks get: the pid is the shim's, as engines know it."""
        return {"ociVersion": self.spec.oci_version, "id": self.id, "status": status, "pid": os.getpid(),
                "bundle": self.spec.bundle, "annotations": dict(self.spec.annotations)}

    async def run_hooks(self, stage: str, status: str, fatal: bool) -> list[str]:
        """Runs a stage's hooks off the event loop. Every stage but createContainer runs in the
        network namespace the shim started in (runc's hooks run in runc's)."""
        if not self.spec.hooks.get(stage):
            return []
        preexec = None if stage == "createContainer" else netns.in_namespace(self.host_netns)
        return await asyncio.to_thread(oci_hooks.run_stage, self.spec.hooks, stage, self.state(status),
                                       self.spec.bundle, preexec, fatal)

    # ---- host mounts ------------------------------------------------------------------------

    def share_mounts(self, run: RunDir, recorded: list[list[Any]]) -> list[dict[str, Any]]:
        """The spec's mounts for the guest, each host bind shared with the VM first and its source
        replaced by the guest's path. Each bind made is appended to `recorded` as
        [mount_point, mount_id] at once (the caller saves it), so a failure half-way leaves
        nothing unrecorded."""
        guest_mounts = []
        for index, mount in enumerate(self.spec.mounts):
            if not mount.get("host"):
                guest_mounts.append(mount)
                continue
            relative = f"{self.id}/mounts/{index}"
            guest_path = self._share_one(run, relative, mount, recorded)
            guest_mounts.append({"type": "bind", "source": guest_path, "destination": mount["destination"],
                                 "options": mount["options"], "shared": True})
        return guest_mounts

    def _share_one(self, run: RunDir, relative: str, mount: dict[str, Any], recorded: list[list[Any]]) -> str:
        source = mount["source"]
        readonly = mount_readonly(mount["options"])
        try:
            fd = os.open(source, os.O_PATH | os.O_CLOEXEC)
        except OSError as err:
            raise SpecError(f"mount {mount['destination']}: bind source {source}: {err.strerror}") from None
        try:
            info = os.fstat(fd)
            if stat.S_ISREG(info.st_mode) and readonly and info.st_size <= FILE_COPY_MAX_BYTES:
                with open(f"/proc/self/fd/{fd}", "rb") as content:
                    return sharedfs.copy_into_share(run, relative, content.fileno())
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                raise SpecError(f"mount {mount['destination']}: bind source {source} is no longer a regular "
                                "file or directory")
            share = sharedfs.bind_into_share(run, relative, f"/proc/self/fd/{fd}", readonly)
            recorded.append([share.mount_point, share.mount_id])
            return share.guest_path
        finally:
            os.close(fd)


def unbind_all(recorded: list[list[Any]]) -> None:
    """Undoes share_mounts' binds by their recorded mount IDs (never raises; see sharedfs.unbind)."""
    for mount_point, mount_id in reversed(recorded):
        sharedfs.unbind(mount_point, mount_id)
