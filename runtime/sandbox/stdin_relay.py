"""A container process's stdin: the host fd a container engine gave, relayed to the guest process.

containerd hands `create` and `exec` a pipe (or /dev/null when there is no stdin); runc's
process reads it directly, ours reads a pipe in the guest that the agent fills (WriteStdin)
and closes at end of file (CloseStdin). Each write is answered once the guest's pipe took it,
so a process that does not read holds the relay up instead of the shim buffering without bound.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import stat
from typing import Protocol

from factory.errors import AgentError

# One read's worth: a pipe's default capacity, and well under one agent frame.
CHUNK_BYTES = 64 * 1024
# /dev/null's device number (mem major 1, minor 3): nothing to relay from it.
_DEV_NULL = os.makedev(1, 3)

log = logging.getLogger(__name__)


class StdinSink(Protocol):
    async def write_stdin(self, exec_id: str, data: bytes, timeout_s: float | None) -> None: ...

    async def close_stdin(self, exec_id: str) -> None: ...


def is_readable_stdin(fd: int) -> bool:
    """True if `fd` is open for reading and not /dev/null: the process gets a stdin pipe then."""
    try:
        info = os.fstat(fd)
    except OSError:
        return False
    if stat.S_ISCHR(info.st_mode) and info.st_rdev == _DEV_NULL:
        return False
    try:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError:
        return False
    return mode in (os.O_RDONLY, os.O_RDWR)


async def _readable(fd: int) -> bool:
    """Waits until `fd` has data or end of file; False if it cannot be polled (a regular file,
    which never blocks)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    try:
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    except PermissionError:
        return False
    try:
        await ready
    finally:
        loop.remove_reader(fd)
    return True


async def relay(sink: StdinSink, exec_id: str, fd: int) -> None:
    """Copies `fd` to the process's stdin until end of file, then closes it. The fd stays in
    blocking mode (it may be a terminal the user's shell shares): it is read only once poll
    says it is ready, so the read returns at once."""
    try:
        while True:
            await _readable(fd)
            data = os.read(fd, CHUNK_BYTES)
            if not data:
                break
            # No time limit: a process may rightly leave its stdin unread for as long as it likes.
            await sink.write_stdin(exec_id, data, timeout_s=None)
        await sink.close_stdin(exec_id)
    except (AgentError, OSError) as err:
        # The process exited (its stdin is gone) or our side of the fd broke: nothing more to send.
        log.info("stdin of %s: relay ended: %s", exec_id, err)
