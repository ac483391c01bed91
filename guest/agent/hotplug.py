"""Onlining hot-plugged CPUs and memory blocks through sysfs.

Hot-added CPUs (QMP device_add of a CPU) and memory blocks (a pc-dimm) arrive offline in the
guest: the kernel has no policy to online them in this configuration, so the agent does it, both
on request and as their "add" uevents arrive.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, List, Optional

from guest.agent.guestfs import GuestRoot

_CPU_DIR = re.compile(r"cpu(\d+)$")
_MEMORY_DIR = re.compile(r"memory(\d+)$")


class OnlineResult:
    def __init__(self) -> None:
        self.onlined: List[int] = []
        # "cpu3: Device or resource busy": why a device stayed offline.
        self.failures: List[str] = []


def _numbered(directory: str, pattern: "re.Pattern[str]") -> List[int]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    numbers = []
    for name in names:
        match = pattern.match(name)
        if match:
            numbers.append(int(match.group(1)))
    return sorted(numbers)


def present_cpus(root: GuestRoot) -> List[int]:
    return _numbered(root.cpu_dir, _CPU_DIR)


def _cpu_online_file(root: GuestRoot, cpu: int) -> str:
    return os.path.join(root.cpu_dir, f"cpu{cpu}", "online")


def is_cpu_online(root: GuestRoot, cpu: int) -> bool:
    try:
        with open(_cpu_online_file(root, cpu)) as f:
            return f.read().strip() == "1"
    except FileNotFoundError:
        # No `online` file: a CPU that cannot be offlined (the boot CPU).
        return os.path.isdir(os.path.join(root.cpu_dir, f"cpu{cpu}"))


def count_online_cpus(root: GuestRoot) -> int:
    return sum(1 for cpu in present_cpus(root) if is_cpu_online(root, cpu))


def online_cpus(root: GuestRoot, cpus: Optional[Iterable[int]] = None) -> OnlineResult:
    """Online the given CPUs (default: every present one) that are offline."""
    result = OnlineResult()
    for cpu in present_cpus(root) if cpus is None else cpus:
        if is_cpu_online(root, cpu):
            continue
        try:
            with open(_cpu_online_file(root, cpu), "w") as f:
                f.write("1")
        except OSError as exc:
            result.failures.append(f"cpu{cpu}: {exc.strerror or exc}")
        else:
            result.onlined.append(cpu)
    return result


def memory_blocks(root: GuestRoot) -> List[int]:
    return _numbered(root.memory_dir, _MEMORY_DIR)


def _memory_state_file(root: GuestRoot, block: int) -> str:
    return os.path.join(root.memory_dir, f"memory{block}", "state")


def online_memory(root: GuestRoot, blocks: Optional[Iterable[int]] = None) -> OnlineResult:
    """Online the given memory blocks (default: every one) that are offline."""
    result = OnlineResult()
    for block in memory_blocks(root) if blocks is None else blocks:
        path = _memory_state_file(root, block)
        try:
            with open(path) as f:
                if f.read().strip() != "offline":
                    continue
            # "online" lets the kernel pick the zone (its default policy for this config).
            with open(path, "w") as f:
                f.write("online")
        except FileNotFoundError:
            continue  # removed again, or not a memory block after all
        except OSError as exc:
            result.failures.append(f"memory{block}: {exc.strerror or exc}")
        else:
            result.onlined.append(block)
    return result


def memory_block_bytes(root: GuestRoot) -> int:
    """Size of one memory block (hex in sysfs); 0 when the guest has no memory hot-plug."""
    try:
        with open(os.path.join(root.memory_dir, "block_size_bytes")) as f:
            return int(f.read().strip(), 16)
    except FileNotFoundError:
        return 0


def _memory_state(root: GuestRoot, block: int) -> Optional[str]:
    try:
        with open(_memory_state_file(root, block)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def offline_memory_blocks(root: GuestRoot) -> List[int]:
    return [block for block in memory_blocks(root) if _memory_state(root, block) == "offline"]


def online_memory_mib(root: GuestRoot) -> int:
    """Memory in online blocks, MiB: boot memory plus every hot-plugged block that is online.

    Unlike MemTotal (which the kernel's own reservations lower), this adds up to the VM's
    configured size once all of it is online, so the host can wait for an exact target."""
    online = sum(1 for block in memory_blocks(root) if _memory_state(root, block) == "online")
    return online * memory_block_bytes(root) >> 20


def device_number(devpath: str, kind: str) -> Optional[int]:
    """The N of /devices/system/cpu/cpuN (kind "cpu") or .../memory/memoryN (kind "memory")."""
    match = (_CPU_DIR if kind == "cpu" else _MEMORY_DIR).search(devpath)
    if match and devpath.startswith(f"/devices/system/{kind}/"):
        return int(match.group(1))
    return None
