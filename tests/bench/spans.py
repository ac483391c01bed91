"""Where the time of one get_vm goes: the library's OpenTelemetry spans,
caught by an in-memory exporter, plus a few bench-only probe spans around
calls the library does not trace (QEMU process start, QMP and agent connect,
the VMCache hand-over's attach).

A get_vm is one trace (the library passes its context explicitly), so its
spans are picked by trace id; a cache refill running meanwhile is another
trace and stays out. Probe spans have no parent and are picked by the VM id
they carry.
"""
from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from factory import tracing
from factory.agent import client as agent_client
from factory.hypervisor import qemu as qemu_module
from factory.hypervisor import qmp as qmp_module
from factory.vm import VM

_PROBE_TRACER = "kata_vmfactory.bench"

_exporter: InMemorySpanExporter | None = None


def capture() -> InMemorySpanExporter:
    """Installs the in-memory exporter once per process (a tracer provider can be set once)."""
    global _exporter
    if _exporter is None:
        _exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        trace.set_tracer_provider(provider)
    return _exporter


def _probe_async(name: str, vm_id_of) -> Any:
    def wrap(fn):
        @functools.wraps(fn)
        async def probed(*args, **kwargs):
            with tracing.span(_PROBE_TRACER, name, None, vm_id=vm_id_of(*args, **kwargs)):
                return await fn(*args, **kwargs)
        return probed
    return wrap


@contextlib.contextmanager
def probes() -> Iterator[None]:
    """Bench-only spans around untraced library calls; the originals come back on exit."""
    saved = [
        (qemu_module, "_daemonize", qemu_module._daemonize),
        (qmp_module.QMP, "connect", qmp_module.QMP.connect),
        (agent_client.AgentClient, "connect", agent_client.AgentClient.connect),
        (VM, "attach", VM.__dict__["attach"]),
    ]
    qemu_module._daemonize = _probe_async("bench.QemuProcessStart", lambda cmd, run: run.vm_id)(
        qemu_module._daemonize)
    # Socket paths are <run root>/<vm id>/<name>.sock.
    qmp_module.QMP.connect = _probe_async("bench.QMPConnect", lambda self, *a, **k: Path(self.socket_path).parent.name)(
        qmp_module.QMP.connect)
    agent_client.AgentClient.connect = _probe_async(
        "bench.AgentConnect", lambda self, *a, **k: Path(self.socket_path).parent.name)(
        agent_client.AgentClient.connect)
    attach = VM.__dict__["attach"].__func__
    VM.attach = classmethod(_probe_async("bench.Attach", lambda cls, config, state, *a, **k: state.id)(attach))
    try:
        yield
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


def get_vm_spans(exporter: InMemorySpanExporter, vm_id: str) -> list[ReadableSpan]:
    """The last GetVM trace's spans plus the probe spans of VM `vm_id`, by start time."""
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name == "GetVM"]
    if not roots:
        return []
    trace_id = roots[-1].context.trace_id
    picked = [s for s in spans if s.context.trace_id == trace_id
              or (s.name.startswith("bench.") and s.attributes.get("vm_id") == vm_id)]
    return sorted(picked, key=lambda s: s.start_time)


# (label, span name, "start" | "end" | "last end"): consecutive milestones make the phases;
# "last end" is the end of the span's last occurrence (a request that was retried).
Milestones = Sequence[tuple[str, str, str]]

# The handoff request (reseed + clock + check) is sent before QMP cont and answered after it; on a
# new agent connection it may be retried, and a slow answer is followed by one more clock set.
_TAIL: Milestones = (
    ("resume (QMP cont)", "hypervisor.ResumeVM", "end"),
    ("handoff answered (reseed + clock + check)", "agent.Handoff", "last end"),
    ("clock set again (slow handoff)", "agent.SetGuestDateTime", "end"),
)
MILESTONES: dict[str, Milestones] = {
    "direct": (("get_vm setup", "direct.GetBaseVM", "start"),
               ("QEMU process start", "bench.QemuProcessStart", "end"),
               ("QMP connect", "bench.QMPConnect", "end"),
               ("agent socket connect", "bench.AgentConnect", "end"),
               ("guest boot → agent answered", "vm.WaitAgent", "end"),
               ("pause (QMP stop)", "hypervisor.PauseVM", "end")) + tuple(_TAIL),
    "template": (("get_vm setup", "template.GetBaseVM", "start"),
                 ("QEMU process start", "bench.QemuProcessStart", "end"),
                 ("QMP connect", "bench.QMPConnect", "end"),
                 ("device state load", "hypervisor.LoadState", "end"),
                 ("agent socket connect", "bench.AgentConnect", "end")) + tuple(_TAIL),
    "cache": (("get_vm setup", "cache.GetBaseVM", "start"),
              ("take from pool", "cache.GetBaseVM", "end")) + tuple(_TAIL),
    "vmcache": (("get_vm setup", "grpccache.GetBaseVM", "start"),
                ("GetBaseVM RPC", "bench.Attach", "start"),
                ("QMP connect", "bench.QMPConnect", "end"),
                ("agent socket connect", "bench.Attach", "end")) + tuple(_TAIL),
}
PHASE_ORDER = ["get_vm setup", "take from pool", "GetBaseVM RPC", "QEMU process start", "QMP connect",
               "device state load", "agent socket connect", "guest boot → agent answered", "pause (QMP stop)",
               "resume (QMP cont)", "handoff answered (reseed + clock + check)", "clock set again (slow handoff)",
               "rest"]


def phases(spans: Sequence[ReadableSpan], milestones: Milestones) -> dict[str, float]:
    """Milliseconds per phase of one get_vm; they add up to the GetVM span ("total")."""
    root = next((s for s in spans if s.name == "GetVM"), None)
    if root is None:
        return {}
    first: dict[str, ReadableSpan] = {}
    last: dict[str, ReadableSpan] = {}
    for s in spans:
        first.setdefault(s.name, s)
        last[s.name] = s
    out: dict[str, float] = {}
    previous = root.start_time
    for label, name, edge in milestones:
        span = (last if edge == "last end" else first).get(name)
        if span is None:
            continue  # its time lands in the next phase found
        at = max(span.start_time if edge == "start" else span.end_time, previous)
        out[label] = (at - previous) / 1e6
        previous = at
    out["rest"] = (root.end_time - previous) / 1e6
    out["total"] = (root.end_time - root.start_time) / 1e6
    return out


def span_cost_us(count: int = 2000) -> float:
    """What recording one span costs here (µs): the tracing overhead inside each figure."""
    exporter = capture()
    start = time.perf_counter()
    for _ in range(count):
        with tracing.span(_PROBE_TRACER, "bench.Overhead", None):
            pass
    cost = (time.perf_counter() - start) / count * 1e6
    exporter.clear()
    return cost
