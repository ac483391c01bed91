"""Where the agent reads and writes guest state: /proc, /sys and /dev, under a movable root.

The root is "/" in the guest; unit tests point it at a temporary tree laid out like sysfs.
"""

from __future__ import annotations

import os
from typing import List, NamedTuple, Optional


class GuestRoot(NamedTuple):
    root: str = "/"
    # The random device is separate from `root`: tests use the host's real /dev/urandom with a
    # fake sysfs (a regular file would reject the reseed ioctl).
    urandom: str = "/dev/urandom"
    # The container helper (guest/contain/contain.c); build_initramfs puts it here.
    contain: str = "/sbin/vmf-contain"

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def cpu_dir(self) -> str:
        return self.path("sys/devices/system/cpu")

    @property
    def memory_dir(self) -> str:
        return self.path("sys/devices/system/memory")

    @property
    def virtio_ports_dir(self) -> str:
        return self.path("sys/class/virtio-ports")

    def dev(self, name: str) -> str:
        return self.path("dev", name)

    def read_text(self, *parts: str) -> str:
        with open(self.path(*parts)) as f:
            return f.read()

    def boot_id(self) -> str:
        return self.read_text("proc/sys/kernel/random/boot_id").strip()

    def mem_total_kib(self) -> int:
        for line in self.read_text("proc/meminfo").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
        raise ValueError(f"no MemTotal line in {self.path('proc/meminfo')}")

    def possible_cpus(self) -> Optional[int]:
        """How many CPUs the guest can ever have (-smp maxcpus), or None if unknown."""
        try:
            text = self.read_text("sys/devices/system/cpu/possible")
        except FileNotFoundError:
            return None
        return len(parse_cpu_list(text))


def parse_cpu_list(text: str) -> List[int]:
    """'0-2,4' -> [0, 1, 2, 4] (the kernel's cpulist format)."""
    cpus: List[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus
