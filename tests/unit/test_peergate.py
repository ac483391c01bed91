"""The VMCache endpoint serves only allowed uids (SO_PEERCRED), relaying them to gRPC unchanged."""
from __future__ import annotations

import asyncio
import os

import grpc
import pytest
from google.protobuf import wrappers_pb2

from vmcache.peergate import PeerGate


def _echo_handler() -> grpc.GenericRpcHandler:
    async def echo(request: wrappers_pb2.StringValue, context) -> wrappers_pb2.StringValue:
        return wrappers_pb2.StringValue(value=request.value * 2)
    return grpc.method_handlers_generic_handler("test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(
        echo, request_deserializer=wrappers_pb2.StringValue.FromString,
        response_serializer=wrappers_pb2.StringValue.SerializeToString)})


async def _with_gate(tmp_path, allowed: frozenset[int], body) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([_echo_handler()])
    inner = str(tmp_path / "inner.sock")
    server.add_insecure_port(f"unix:{inner}")
    await server.start()
    gate = PeerGate(str(tmp_path / "public.sock"), inner, allowed)
    await gate.start()
    try:
        await body(gate)
    finally:
        await gate.stop()
        await server.stop(0)


def test_an_allowed_peer_is_served_through_the_gate(tmp_path):
    async def body(gate: PeerGate) -> None:
        assert oct(os.stat(gate.public_path).st_mode & 0o777) == "0o600"
        async with grpc.aio.insecure_channel(f"unix:{gate.public_path}") as channel:
            call = channel.unary_unary("/test.Echo/Echo", request_serializer=wrappers_pb2.StringValue.SerializeToString,
                                       response_deserializer=wrappers_pb2.StringValue.FromString)
            for size in (1, 100_000):  # one frame, and many relay chunks
                reply = await call(wrappers_pb2.StringValue(value="x" * size), timeout=10)
                assert reply.value == "x" * (2 * size)

    asyncio.run(_with_gate(tmp_path, frozenset({os.geteuid()}), body))


def test_a_peer_of_another_uid_is_cut_off_before_any_byte_reaches_grpc(tmp_path):
    """Our own uid is left out of the allowed set, so this process is the stranger (no setuid
    needed, which a sandbox's user namespace may not allow)."""
    async def body(gate: PeerGate) -> None:
        reader, writer = await asyncio.open_unix_connection(gate.public_path)
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        try:
            assert await asyncio.wait_for(reader.read(100), 10) == b""
        except ConnectionResetError:
            pass
        writer.close()
        async with grpc.aio.insecure_channel(f"unix:{gate.public_path}") as channel:
            call = channel.unary_unary("/test.Echo/Echo", request_serializer=wrappers_pb2.StringValue.SerializeToString,
                                       response_deserializer=wrappers_pb2.StringValue.FromString)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(wrappers_pb2.StringValue(value="x"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(_with_gate(tmp_path, frozenset({os.geteuid() + 1}), body))
