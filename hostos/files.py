"""Writing files the project creates at paths a user or another process names: never through a
symlink, never half-written (a temporary file in the same directory, then renamed or linked)."""
from __future__ import annotations

import os
import secrets


class SymlinkRefused(OSError):
    """The path to write is a symlink; nothing was written."""


def write_atomic(path: str, data: bytes, mode: int = 0o644, replace: bool = True) -> None:
    """Writes `path` whole or not at all. A symlink at `path` is refused, not followed. With
    replace=False an existing `path` raises FileExistsError (and is left as it was)."""
    if os.path.islink(path):
        raise SymlinkRefused(f"refusing to write {path}: it is a symlink; remove it or choose another path")
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        # No fsync: readers need a whole file, not one that survives a crash (state lives on /run,
        # which a reboot empties anyway), and an fsync costs milliseconds on a VM's hot path.
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if replace:
            # rename() replaces a symlink that appeared meanwhile; it never writes through one.
            os.rename(temporary, path)
        else:
            os.link(temporary, path)  # fails if anything (file or symlink) is there now
    finally:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
