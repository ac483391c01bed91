"""Who may talk to the VMCache server: the peer's credentials (SO_PEERCRED), checked per connection.

grpcio exposes no peer credentials for Unix sockets (context.peer() is "unix:", the auth context
is empty, local_server_credentials(UDS) does not check the peer: grpc/grpc#15511, #28755) and no
way to hand it an accepted fd. So the public endpoint is ours: each connection's SO_PEERCRED is
checked, and an allowed one is relayed byte for byte to the gRPC server, which listens only on a
socket in a private (0700) directory. The cost is one relay hop per call (see README numbers).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct

log = logging.getLogger(__name__)

# struct ucred: pid, uid, gid (all 32-bit on Linux).
_UCRED = struct.Struct("3i")
# One read per relay step: gRPC frames for GetBaseVM are a few hundred bytes; this bounds memory.
RELAY_CHUNK = 64 * 1024


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected, as the kernel recorded them at connect()."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


class PeerGate:
    """Listens on `public_path`; relays connections from `allowed_uids` to `inner_path`."""

    def __init__(self, public_path: str, inner_path: str, allowed_uids: frozenset[int]) -> None:
        self.public_path = public_path
        self.inner_path = inner_path
        self.allowed_uids = allowed_uids
        self._server: asyncio.base_events.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        # Created 0600 from the first instant, not chmod-ed after a window.
        previous = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._accept, path=self.public_path)
        finally:
            os.umask(previous)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for relay in list(self._relays):
            relay.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pid, uid, _ = peer_credentials(writer.get_extra_info("socket"))
        if uid not in self.allowed_uids:
            log.warning("refused a VMCache client (pid %d, uid %d): only uids %s may take VMs",
                        pid, uid, sorted(self.allowed_uids))
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None  # a connection handler always runs as a task
        self._relays.add(task)
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(self.inner_path)
        except OSError as err:
            log.warning("VMCache relay cannot reach its gRPC server at %s: %s", self.inner_path, err)
            writer.close()
            self._relays.discard(task)
            return
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        except asyncio.CancelledError:
            pass  # stop(): this task is the top of its own stack; asyncio would log a re-raise
        finally:
            for w in (writer, up_writer):
                w.close()
            self._relays.discard(task)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(RELAY_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()
