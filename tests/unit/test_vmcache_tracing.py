"""The client's trace context crosses the VMCache socket: server spans join the client's trace."""
import asyncio
import os
import tempfile

import grpc
from google.protobuf import empty_pb2
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from factory import tracing
from factory.factory import Factory
from factory.grpccache import _metadata
from native import vmstate
from tests.unit import fakes
from vmcache.service import CacheService

_exporter = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(_exporter))
trace.set_tracer_provider(_provider)


def test_get_base_vm_span_is_a_child_of_the_clients_span():
    workdir = tempfile.TemporaryDirectory(prefix="kvf-u-", dir="/tmp")  # short: a socket path
    socket_path = os.path.join(workdir.name, "cache.sock")

    async def body():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([CacheService(Factory(fakes.StatefulBase()), lambda: None).handler()])
        server.add_insecure_port(f"unix:{socket_path}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix://{socket_path}") as channel:
                call = channel.unary_unary("/cache.CacheService/GetBaseVM",
                                           request_serializer=empty_pb2.Empty.SerializeToString,
                                           response_deserializer=vmstate.decode_grpc_vm)
                with tracing.span("test", "CreateSandbox") as ctx:
                    fields = await call(empty_pb2.Empty(), metadata=_metadata(ctx), timeout=10)
            assert fields.cpu == 1 and fields.memory == 512
        finally:
            await server.stop(0)

    _exporter.clear()
    with workdir:
        asyncio.run(body())
    spans = {s.name: s for s in _exporter.get_finished_spans()}
    client, server_span = spans["CreateSandbox"], spans["vmcache.GetBaseVM"]
    assert server_span.context.trace_id == client.context.trace_id
    assert server_span.parent.span_id == client.context.span_id
