"""Finding and opening the agent's virtio-serial port."""

from __future__ import annotations

import fcntl
import os
import time
from typing import Optional

from guest.agent.guestfs import GuestRoot
from guest.agent.log import log

AGENT_PORT_NAME = "agent.0"
# The port appears once the host's control message naming it is processed after virtio_console
# loads: usually within milliseconds of init starting the agent. Log if it takes longer.
PORT_WAIT_LOG_AFTER_S = 5.0
PORT_WAIT_POLL_S = 0.01


class PortNotFoundError(Exception):
    pass


def find_port(root: GuestRoot, name: str = AGENT_PORT_NAME) -> Optional[str]:
    """/dev/vportNpM of the virtio-serial port called `name`, or None if there is none yet."""
    try:
        entries = sorted(os.listdir(root.virtio_ports_dir))
    except FileNotFoundError:
        return None
    for entry in entries:
        try:
            port_name = root.read_text("sys/class/virtio-ports", entry, "name").strip()
        except OSError:
            continue
        if port_name == name:
            return root.dev(entry)
    return None


def wait_for_port(root: GuestRoot, name: str = AGENT_PORT_NAME) -> str:
    """Block until the port exists (with its /dev node); forever, logging while it is late."""
    started = time.monotonic()
    logged = False
    while True:
        path = find_port(root, name)
        if path is not None and os.path.exists(path):
            return path
        if not logged and time.monotonic() - started > PORT_WAIT_LOG_AFTER_S:
            log(
                f"no virtio-serial port named {name!r} after {PORT_WAIT_LOG_AFTER_S:g} s; "
                "is QEMU given -device virtserialport,name=agent.0? still waiting"
            )
            logged = True
        time.sleep(PORT_WAIT_POLL_S)


def open_port(path: str) -> int:
    """Open the port non-blocking with SIGIO notification of host (dis)connects.

    The caller must have a SIGIO handler installed first (the default action kills the process).
    virtio_console sends SIGIO to the owner when the host side opens or closes, which is how the
    agent learns that a host connected without polling a port that reports POLLHUP meanwhile.
    """
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_ASYNC)
    return fd
