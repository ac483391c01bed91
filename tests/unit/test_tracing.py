"""One get_vm is one trace: every VM and agent span is a child of GetVM."""
import asyncio

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from factory import tracing
from factory.factory import Factory
from tests.unit.fakes import FlakyBase as _FlakyBase
from tests.unit.fakes import config as _config

_exporter = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(_exporter))
trace.set_tracer_provider(_provider)


def test_get_vm_is_one_trace_rooted_at_get_vm():
    _exporter.clear()

    async def body():
        with tracing.span("test", "CreateSandbox") as ctx:
            await Factory(_FlakyBase()).get_vm(_config(num_vcpus=2), ctx)
    asyncio.run(body())
    spans = _exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    root = next(s for s in spans if s.name == "CreateSandbox")
    get_vm = next(s for s in spans if s.name == "GetVM")
    assert get_vm.parent.span_id == root.context.span_id
    assert {s.context.trace_id for s in spans} == {root.context.trace_id}
    for s in spans:
        if s is root:
            continue
        # walk up to GetVM: every span hangs below it
        node = s
        while node is not get_vm:
            assert node.parent is not None, f"{s.name} is not under GetVM"
            node = by_id[node.parent.span_id]
    assert get_vm.attributes["subsystem"] == "factory"


def test_a_failing_span_records_the_error():
    _exporter.clear()
    try:
        with tracing.span("test", "Boom"):
            raise ValueError("bad value 7")
    except ValueError:
        pass
    (span,) = _exporter.get_finished_spans()
    assert not span.status.is_ok and "bad value 7" in span.status.description
