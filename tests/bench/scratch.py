"""One directory per benchmark run that holds everything a benchmark starts
(VM run dirs, templates and their tmpfs mounts, the VMCache server's config and
socket), so a final sweep can find and remove whatever a failure or Ctrl-C left.

Each benchmark cleans up in its own `finally` first (stop VMs, close factories,
SIGTERM the server); the sweep is the safety net and reports what it had to do.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

from hostos.process import pids_mentioning


def _mounts_under(root: str) -> list[str]:
    with open("/proc/mounts") as f:
        points = [line.split()[1] for line in f]
    prefix = root.rstrip("/") + "/"
    # Deepest first, so nested mounts come off before their parents.
    return sorted((p for p in points if p == root or p.startswith(prefix)), key=len, reverse=True)


class Scratch:
    """A short directory under /tmp: Unix socket paths must stay under 107 bytes."""

    def __init__(self, prefix: str = "kvfb-") -> None:
        self.root = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
        self._swept = False

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def sweep(self) -> list[str]:
        """Kills what still runs from the root, unmounts, removes it; returns what leaked."""
        if self._swept:
            return []
        self._swept = True
        leaks: list[str] = []
        marker = self.root + "/"
        pids = pids_mentioning(marker)
        for pid in pids:
            leaks.append(f"process {pid} still running")
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)  # QEMU daemonizes into its own group
            except OSError:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        deadline = time.monotonic() + 5
        while pids and pids_mentioning(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        for mountpoint in _mounts_under(self.root):
            leaks.append(f"mount {mountpoint} left behind")
            subprocess.run(["umount", "-l", mountpoint], check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        if os.path.exists(self.root):
            leaks.append(f"{self.root} could not be removed")
        return leaks
