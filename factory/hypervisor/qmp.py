"""A QMP connection with the guarantees qemu.qmp leaves to its caller.

qemu.qmp has no connect retry, no per-call timeout and an unbounded default
event queue; a QMP socket serves one client at a time, so connecting to a VM
someone else still holds would wait for a greeting forever.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Callable

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from factory.errors import HypervisorError, HypervisorTimeoutError

# QEMU answers QMP in about a millisecond; seconds mean it is wedged or the
# host is badly overloaded, and the caller should hear about it.
QMP_CALL_TIMEOUT_S = 10.0
# Between tries while QEMU creates its QMP socket.
CONNECT_RETRY_S = 0.005

logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class QMP:
    def __init__(self, socket_path: str, name: str) -> None:
        self.socket_path = socket_path
        self._client = QMPClient(name)

    async def connect(self, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> None:
        """Connects, retrying until QEMU accepts; fails early if QEMU has exited."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HypervisorTimeoutError(
                    f"QMP socket {self.socket_path} did not answer within {timeout_s:.1f} s "
                    "(is another process still connected to it?)")
            try:
                await asyncio.wait_for(self._client.connect(self.socket_path), remaining)
                return
            except (ConnectError, OSError) as err:
                if not alive():
                    raise HypervisorError(f"QEMU exited before its QMP socket {self.socket_path} answered") from err
                await asyncio.sleep(CONNECT_RETRY_S)
            except asyncio.TimeoutError:
                continue

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout_s: float = QMP_CALL_TIMEOUT_S) -> Any:
        # Nobody reads the default event listener (it cannot be removed); in a
        # long-lived server its queue would grow without bound.
        self._client.events.clear()
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), timeout_s)
        except asyncio.TimeoutError as err:
            raise HypervisorTimeoutError(f"QMP {command} on {self.socket_path} did not answer within "
                                         f"{timeout_s:.1f} s") from err
        except ExecuteError as err:
            raise HypervisorError(f"QMP {command} {arguments or ''} failed: {err.error_class}: {err}") from err
        except (QMPError, EOFError, OSError) as err:
            raise HypervisorError(f"QMP {command} on {self.socket_path} failed: QEMU went away ({err!r})") from err

    async def pass_fd(self, fd: int, name: str) -> None:
        """Hands an open file to QEMU by name (getfd), for `fd:NAME` migration URIs.

        The name must not be numeric: QEMU reads `fd:123` as a raw fd number.
        """
        if name.isdigit():
            raise ValueError(f"QMP fd name {name!r} must not be numeric")
        self._client.send_fd_scm(fd)
        await self.execute("getfd", {"fdname": name})

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._client.disconnect(), QMP_CALL_TIMEOUT_S)
        except (EOFError, OSError, asyncio.TimeoutError):
            pass  # after `quit` the peer is gone already; nothing to release
        except Exception:  # qemu.qmp re-raises whatever ended its reader
            pass


def fd_from_path(path: str, write: bool) -> int:
    flags = (os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if write else os.O_RDONLY
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)  # a planted symlink is not followed
