"""A VM's run directory: every file a VM's owner (or a later owner) needs.

Everything about a running VM that another process must know to re-attach it
lives here, so a VM can change hands (VMCache) by passing its id and root.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

DEFAULT_RUN_ROOT = "/run/vc/vm"
# sockaddr_un.sun_path is 108 bytes with the terminating NUL.
MAX_SOCKET_PATH = 107


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
    def console_log(self) -> Path:
        return self.path / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.path / "qemu.log"

    @property
    def state_file(self) -> Path:
        return self.path / "hypervisor.json"

    @property
    def shared_dir(self) -> Path:
        """Exported to the guest over 9p; container rootfs are bind-mounted below it."""
        return self.path / "shared"

    def create(self) -> None:
        longest = max(len(str(self.qmp_socket)), len(str(self.agent_socket)))
        if longest > MAX_SOCKET_PATH:
            raise ValueError(f"run directory {self.path} is too long for Unix sockets ({longest} > {MAX_SOCKET_PATH} bytes); use a shorter run root")
        self.path.mkdir(mode=0o700, parents=True, exist_ok=False)
        self.shared_dir.mkdir(mode=0o700)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

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
