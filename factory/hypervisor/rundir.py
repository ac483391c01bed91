"""A VM's run directory: every file a VM's owner (or a later owner) needs.

Everything about a running VM that another process must know to re-attach it
lives here, so a VM can change hands (VMCache) by passing its id and root.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

from factory.errors import ConfigError, HypervisorError
from hostos import files, mountinfo, mounts, safetree

DEFAULT_RUN_ROOT = "/run/vc/vm"
# sockaddr_un.sun_path is 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107
# The guest console's cap: a boot panic and the agent's messages take a few KiB; a guest printing
# forever stops here instead of filling the host's /run.
LOGS_MIB = 1
LOGS_MOUNT_SOURCE = "kata-vmfactory-logs"


@dataclasses.dataclass(frozen=True)
class RunDir:
    root: Path
    vm_id: str

    @property
    def path(self) -> Path:
        return self.root / self.vm_id

    @property
    def qmp_socket(self) -> Path:
        return self.path / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.path / "agent.sock"

    @property
    def pidfile(self) -> Path:
        return self.path / "pid"

    @property
    def logs_dir(self) -> Path:
        """A tmpfs of LOGS_MIB for what the guest makes QEMU write (the console): once full,
        QEMU's writes fail and are dropped, and the host's /run is untouched."""
        return self.path / "logs"

    @property
    def console_log(self) -> Path:
        return self.logs_dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.path / "qemu.log"

    @property
    def state_file(self) -> Path:
        return self.path / "hypervisor.json"

    @property
    def shared_dir(self) -> Path:
        """Exported to the guest over 9p: a read-only bind of shared_writable_dir, so a guest (QEMU
        writes as root) can rename or replace nothing in it; container rootfs are bind-mounted below
        it and are the only writable parts."""
        return self.path / "shared"

    @property
    def shared_writable_dir(self) -> Path:
        """The host's writable view of shared_dir, never exported: the host makes directories here."""
        return self.path / "shared.rw"

    @property
    def shared_mount_record(self) -> Path:
        """The mount ID of the read-only bind at shared_dir, so remove() unmounts exactly that."""
        return self.path / "shared.mount"

    def create(self, record_owner: Callable[[Path], None] | None = None) -> None:
        """Makes the directory and its read-only share. `record_owner` runs as soon as the directory
        exists, before anything is mounted in it: a crash after that leaves a directory whose owner
        is on record, so the reaper can tell an orphan and undo the mount."""
        longest = max(len(str(self.qmp_socket)), len(str(self.agent_socket)))
        if longest > MAX_SOCKET_PATH:
            raise ConfigError(f"run directory {self.path} is too long for Unix sockets "
                              f"({longest} > {MAX_SOCKET_PATH} bytes); use a shorter runtime.vm_run_root")
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=False)
        except OSError as err:
            raise HypervisorError(f"cannot create run directory {self.path}: {err}") from err
        try:
            if record_owner is not None:
                record_owner(self.path)
            self.shared_writable_dir.mkdir(mode=0o700)
            self.shared_dir.mkdir(mode=0o700)
            # Before QEMU starts: it holds the directory it opened then, not what is mounted later.
            self._record(self.shared_dir, mounts.bind_recorded(str(self.shared_writable_dir), str(self.shared_dir),
                                                               readonly=True, nosuid_nodev=True))
            self.logs_dir.mkdir(mode=0o700)
            mounts.mount_tmpfs(str(self.logs_dir), LOGS_MIB, source=LOGS_MOUNT_SOURCE)
            self._record(self.logs_dir, mountinfo.path_mount_id(str(self.logs_dir)))
        except OSError as err:
            self.remove()
            raise HypervisorError(f"cannot prepare run directory {self.path} (its share and log mounts need "
                                  f"root): {err}") from err
        except BaseException:
            self.remove()
            raise

    def _record(self, mount_point: Path, mount_id: int) -> None:
        try:
            files.write_atomic(str(self.path / f"{mount_point.name}.mount"), f"{mount_id}\n".encode(),
                               mode=0o600, replace=False)
        except BaseException:
            mounts.unmount_recorded(str(mount_point), mount_id)
            raise

    def remove(self) -> None:
        """Unmounts what create() mounted (the share takes whatever is still mounted below it along),
        then removes the directory without following symlinks or entering any other mount.
        Missing is fine."""
        try:
            for mount_point in (self.shared_dir, self.logs_dir):
                record = self.path / f"{mount_point.name}.mount"
                try:
                    mount_id = int(record.read_text())
                except FileNotFoundError:
                    continue
                except ValueError:
                    raise OSError(f"{record} does not hold a mount ID") from None
                mounts.unmount_recorded(str(mount_point), mount_id)
            safetree.remove_tree(str(self.path))
        except OSError as err:
            raise HypervisorError(f"cannot remove run directory {self.path}: {err}") from err

    def exists(self) -> bool:
        return self.path.is_dir()


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log, for error messages; '' when it does not exist."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])
