"""A directory laid out like the parts of /proc and /sys the agent touches, for host-side tests.

The real files are kernel attributes; here they are plain files, so "hot-plugging" a CPU is
creating a directory and onlining it is the agent writing "1" into a file.
"""

from __future__ import annotations

import os
from typing import Iterable

from guest.agent.guestfs import GuestRoot

BOOT_ID = "0f3c1b1e-6a0e-4d5b-9a52-5b0c8e0f1c2d"
# The container helper as Bazel builds it, relative to a test's runfiles directory (a test's
# BUILD target lists //guest:vmf-contain in its data).
CONTAIN_RUNFILE = "guest/vmf-contain"


def contain_helper() -> str:
    """The vmf-contain binary for host-side tests: $KVF_CONTAIN, or the Bazel runfile."""
    path = os.environ.get("KVF_CONTAIN") or os.path.abspath(CONTAIN_RUNFILE)
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"vmf-contain helper {path} missing: add //guest:vmf-contain to the test's data, "
                                "or set KVF_CONTAIN")
    return path
# x86-64 with less than 64 GiB of RAM: 128 MiB memory blocks, as in the real guest.
FAKE_MEMORY_BLOCK_BYTES = 128 << 20


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


class FakeGuest:
    def __init__(self, directory: str, *, possible_cpus: int = 4, mem_total_kib: int = 500_000) -> None:
        self.directory = directory
        # The host's real /dev/urandom: reading and the reseed ioctl work on it (the latter as root).
        self.root = GuestRoot(directory, urandom="/dev/urandom", contain=contain_helper())
        _write(self.root.path("proc/sys/kernel/random/boot_id"), BOOT_ID + "\n")
        self.set_mem_total(mem_total_kib)
        _write(self.root.path("sys/devices/system/cpu/possible"), f"0-{possible_cpus - 1}\n")
        # The boot CPU has no `online` file: it cannot be offlined.
        os.makedirs(os.path.join(self.root.cpu_dir, "cpu0"), exist_ok=True)
        os.makedirs(self.root.memory_dir, exist_ok=True)
        _write(os.path.join(self.root.memory_dir, "block_size_bytes"), f"{FAKE_MEMORY_BLOCK_BYTES:x}\n")

    def set_mem_total(self, kib: int) -> None:
        _write(self.root.path("proc/meminfo"), f"MemTotal:       {kib} kB\nMemFree:        {kib // 2} kB\n")

    def add_cpu(self, cpu: int, online: bool = False) -> None:
        _write(os.path.join(self.root.cpu_dir, f"cpu{cpu}", "online"), "1\n" if online else "0\n")

    def cpu_online(self, cpu: int) -> bool:
        with open(os.path.join(self.root.cpu_dir, f"cpu{cpu}", "online")) as f:
            return f.read().strip() == "1"

    def add_memory_blocks(self, blocks: Iterable[int], online: bool = False) -> None:
        for block in blocks:
            _write(os.path.join(self.root.memory_dir, f"memory{block}", "state"), "online\n" if online else "offline\n")

    def memory_state(self, block: int) -> str:
        with open(os.path.join(self.root.memory_dir, f"memory{block}", "state")) as f:
            return f.read().strip()

    def add_virtio_port(self, device: str, name: str) -> None:
        _write(os.path.join(self.root.virtio_ports_dir, device, "name"), name + "\n")
        _write(self.root.dev(device), "")


def can_reseed_host_crng() -> bool:
    """RNDRESEEDCRNG needs CAP_SYS_ADMIN, which Bazel's sandbox drops even for root."""
    import fcntl

    from guest.agent.handler import RNDRESEEDCRNG

    try:
        with open("/dev/urandom", "wb") as f:
            fcntl.ioctl(f.fileno(), RNDRESEEDCRNG)
        return True
    except OSError:
        return False
