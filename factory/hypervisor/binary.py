"""Facts about the QEMU binary itself."""
from __future__ import annotations

import subprocess

# `qemu --version` answers at once; a hang means a broken binary.
VERSION_TIMEOUT_S = 10


def qemu_version(path: str) -> str:
    """The first line of `qemu --version`, or 'unknown (why)'."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT_S).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unknown ({err})"
    return out.splitlines()[0] if out else "unknown"
