"""A CacheService served in-process on a Unix socket, for the unit tests of GetBaseVM."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf import empty_pb2

from native import vmstate
from vmcache.service import CacheService

GetBaseVM = Callable[..., Awaitable[vmstate.GrpcVMFields]]


@contextlib.asynccontextmanager
async def serving(service: CacheService) -> AsyncIterator[GetBaseVM]:
    """Serves `service`; yields GetBaseVM as a client calls it (keywords: metadata, timeout)."""
    with tempfile.TemporaryDirectory(prefix="kvf-u-", dir="/tmp") as workdir:  # short: a socket path
        socket_path = os.path.join(workdir, "cache.sock")
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([service.handler()])
        server.add_insecure_port(f"unix:{socket_path}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix://{socket_path}") as channel:
                call = channel.unary_unary("/cache.CacheService/GetBaseVM",
                                           request_serializer=empty_pb2.Empty.SerializeToString,
                                           response_deserializer=vmstate.decode_grpc_vm)
                yield lambda **kwargs: call(empty_pb2.Empty(), **kwargs)
        finally:
            await server.stop(0)
