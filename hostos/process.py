"""Finding and stopping a daemonized QEMU by pid, safely across pid reuse.

QEMU runs with -daemonize in its own session, so it is nobody's child: its
identity is (pid, start time) and it is stopped by signalling its group.
"""
from __future__ import annotations

import os
import signal
import time


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot); None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def is_alive(pid: int, started: int) -> bool:
    return pid > 0 and start_time(pid) == started


def wait_gone(pid: int, started: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_alive(pid, started):
            return True
        time.sleep(0.01)
    return not is_alive(pid, started)


def kill_group(pid: int, started: int, sig: int) -> None:
    if not is_alive(pid, started):
        return
    try:
        # -daemonize forks twice after setsid(): QEMU is in its own group,
        # whose leader (the middle process) has exited, so ask for the group.
        os.killpg(os.getpgid(pid), sig)
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, sig)


def terminate(pid: int, started: int, grace_s: float) -> bool:
    """SIGTERM, then SIGKILL after `grace_s`; True once the process is gone."""
    kill_group(pid, started, signal.SIGTERM)
    if wait_gone(pid, started, grace_s):
        return True
    kill_group(pid, started, signal.SIGKILL)
    return wait_gone(pid, started, grace_s)


def pids_mentioning(text: str) -> list[int]:
    """Live processes (not zombies, not this one) whose command line contains `text`."""
    found = []
    needle = text.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle not in f.read():
                    continue
        except OSError:
            continue
        pid = int(entry)
        if start_time(pid) is not None:
            found.append(pid)
    return found


def kill_mentioning(text: str, grace_s: float) -> None:
    """Last resort when a launch fails before QEMU's pid is known."""
    for pid in pids_mentioning(text):
        started = start_time(pid)
        if started is not None:
            terminate(pid, started, grace_s)


def stdio_to_devnull() -> None:
    """Points this process's stdin, stdout and stderr at /dev/null, letting go of what they were
    (a pipe whose reader waits for every writer to close it)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
