"""Spans with an explicit parent context: no global "current VM" or current span.

Each layer opens its spans with `span(...)` and passes the returned context
down, so one get_vm is one trace even when work crosses tasks or processes.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator, TextIO

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode


@contextlib.contextmanager
def span(tracer: str, name: str, ctx: Context | None = None, **attributes: Any) -> Iterator[Context]:
    """Opens span `name` as a child of `ctx`; yields the context to pass to children."""
    current = trace.get_tracer(tracer).start_span(name, context=ctx, attributes=attributes)
    try:
        yield trace.set_span_in_context(current, ctx)
    except BaseException as err:
        current.record_exception(err)
        current.set_status(Status(StatusCode.ERROR, str(err)))
        raise
    finally:
        current.end()


EXPORTERS = ("none", "console", "otlp")


def setup(exporter: str = "none", service_name: str = "kata-vmfactory", otlp_endpoint: str = "",
          out: TextIO | None = None) -> None:
    """Installs the tracer provider once per process; "none" leaves the no-op tracer.

    The console exporter writes to `out` (default stderr): a sandbox shim's
    stdout and stderr belong to the container, so it passes its log file.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"tracing exporter {exporter!r} is not one of {', '.join(EXPORTERS)}")
    if exporter == "none":
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=out or sys.stderr)))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint or None)))
    trace.set_tracer_provider(provider)
