"""Kernel uevents from a NETLINK_KOBJECT_UEVENT socket (the guest has no udev and no helper)."""

from __future__ import annotations

import errno
import socket
from typing import Dict, List, NamedTuple, Optional

# <linux/netlink.h>; the socket module has no name for it.
NETLINK_KOBJECT_UEVENT = 15
# Multicast group of uevents sent by the kernel itself (group 2 would be udev's re-broadcasts).
KERNEL_UEVENT_GROUP = 1
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; not in the socket module either
# A DIMM of a few GiB adds tens of memory blocks at once; each is one message of ~200 bytes.
# If the buffer overflows anyway, recv reports ENOBUFS and the agent rescans sysfs.
RECEIVE_BUFFER_BYTES = 1 << 20


class Uevent(NamedTuple):
    action: str
    devpath: str
    subsystem: str
    env: Dict[str, str]


def parse_uevent(message: bytes) -> Optional[Uevent]:
    """A kernel uevent: b"add@/devices/...\\0ACTION=add\\0DEVPATH=...\\0SUBSYSTEM=...\\0..."."""
    parts = message.split(b"\0")
    if not parts or b"@" not in parts[0]:
        return None  # not a kernel message (libudev's start with "libudev")
    env: Dict[str, str] = {}
    for part in parts[1:]:
        key, sep, value = part.partition(b"=")
        if sep:
            env[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    action = env.get("ACTION")
    devpath = env.get("DEVPATH")
    if action is None or devpath is None:
        return None
    return Uevent(action, devpath, env.get("SUBSYSTEM", ""), env)


class UeventSocket:
    """Non-blocking listener; fileno() goes into the agent's poll set."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
        try:
            # SO_RCVBUFFORCE ignores rmem_max (the agent runs as root in the guest).
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER_BYTES)
        except OSError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        self._sock.bind((0, KERNEL_UEVENT_GROUP))
        self._sock.setblocking(False)
        self.overflowed = False

    def fileno(self) -> int:
        return self._sock.fileno()

    def receive_all(self) -> List[Uevent]:
        """Every queued uevent. Sets `overflowed` when the kernel dropped some (rescan then)."""
        events: List[Uevent] = []
        while True:
            try:
                message = self._sock.recv(65536)
            except BlockingIOError:
                return events
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overflowed = True
                    continue
                raise
            event = parse_uevent(message)
            if event is not None:
                events.append(event)

    def close(self) -> None:
        self._sock.close()
