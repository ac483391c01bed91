"""The client's trace context crosses the VMCache socket: server spans join the client's trace."""
import asyncio

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from factory import tracing
from factory.factory import Factory
from factory.grpccache import _metadata
from tests.unit import cache_server, fakes
from vmcache.service import CacheService

_exporter = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(_exporter))
trace.set_tracer_provider(_provider)


def test_get_base_vm_span_is_a_child_of_the_clients_span():
    async def body():
        async with cache_server.serving(CacheService(Factory(fakes.StatefulBase()), lambda: None)) as get_base_vm:
            with tracing.span("test", "CreateSandbox") as ctx:
                fields = await get_base_vm(metadata=_metadata(ctx), timeout=10)
        assert fields.cpu == 1 and fields.memory == 512

    _exporter.clear()
    asyncio.run(body())
    spans = {s.name: s for s in _exporter.get_finished_spans()}
    client, server_span = spans["CreateSandbox"], spans["vmcache.GetBaseVM"]
    assert server_span.context.trace_id == client.context.trace_id
    assert server_span.parent.span_id == client.context.span_id
