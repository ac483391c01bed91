"""Cython vs pure-Python twin, and the codec vs protobuf's own (upb) encoder, side by side in one run.

bazel run //tests/bench:native [-- --quick]
The GrpcVM codec (messages/s) and the zero-page scan (GB/s), median of repeats. protobuf's upb
message classes are what a user would otherwise write GetBaseVM with, so the codec must beat them,
not only its pure-Python twin.
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable

from google.protobuf.internal import api_implementation

from native import vmstate, vmstate_pure, zeropages, zeropages_pure
from protocols.cache import cache_pb2
from tests.bench import common, runner

_STATE = json.dumps({"id": "3f1c" * 9, "run_root": "/run/vc/vm", "pid": 123456, "pid_start_time": 987654,
                     "accelerator": "tcg", "num_vcpus": 2, "max_vcpus": 8, "memory_mib": 2304,
                     "max_memory_mib": 24000, "memory_slots": 10, "boot_from_template": True,
                     "hotplugged_cpus": ["cpu-0-1-0"], "hotplugged_memory": [{"id": "dimm1", "size_mib": 256}]},
                    sort_keys=True).encode()
_ARGS = ("3f1c" * 9, _STATE, 0, "", 2, 2304, 1)
# The target: every hot path at least this much faster in Cython.
SPEEDUP_GOAL = 5.0
# And the codec at least this much faster than protobuf's upb encoder and decoder (issue 14).
UPB_SPEEDUP_GOAL = 3.0


def _rate(fn: Callable[[], None], units: float) -> float:
    start = time.perf_counter()
    fn()
    return units / (time.perf_counter() - start)


def _median_rates(*fns: Callable[[], None], units: float, repeats: int) -> tuple[float, ...]:
    """The contenders alternate, so load from other processes hits them all alike."""
    rates: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, found in zip(fns, rates):
            found.append(_rate(fn, units))
    return tuple(statistics.median(found) for found in rates)


def _upb_encode() -> bytes:
    vm_id, hypervisor, proxy_pid, proxy_url, cpu, memory, cpu_delta = _ARGS
    return cache_pb2.GrpcVM(id=vm_id, hypervisor=hypervisor, proxyPid=proxy_pid, proxyURL=proxy_url, cpu=cpu,
                            memory=memory, cpuDelta=cpu_delta).SerializeToString()


def measure(quick: bool) -> tuple[list[tuple[str, str, float, float]], list[tuple[str, float, float]]]:
    """(hot path, unit, pure Python rate, Cython rate) rows, and (codec path, upb rate, Cython rate) rows."""
    repeats = 3 if quick else 7
    n = 20_000 if quick else 100_000
    encoded = vmstate_pure.encode_grpc_vm(*_ARGS)
    if _upb_encode() != encoded:
        raise AssertionError("the GrpcVM codec no longer writes the bytes protobuf writes")
    rows = []
    upb_rows = []
    for label, pure, fast, upb in [
        ("GrpcVM encode", lambda: [vmstate_pure.encode_grpc_vm(*_ARGS) for _ in range(n)],
         lambda: [vmstate.encode_grpc_vm(*_ARGS) for _ in range(n)],
         lambda: [_upb_encode() for _ in range(n)]),
        # Decoding to fields a caller can use: upb's parse plus reading the fields, as GetBaseVM's
        # client would.
        ("GrpcVM decode", lambda: [vmstate_pure.decode_grpc_vm(encoded) for _ in range(n)],
         lambda: [vmstate.decode_grpc_vm(encoded) for _ in range(n)],
         lambda: [_upb_fields(cache_pb2.GrpcVM.FromString(encoded)) for _ in range(n)]),
    ]:
        pure_rate, fast_rate, upb_rate = _median_rates(pure, fast, upb, units=n, repeats=repeats)
        rows.append((label, "msg/s", pure_rate, fast_rate))
        upb_rows.append((label, upb_rate, fast_rate))

    # A template-like image: mostly zero pages with a written page every fourth.
    size = (64 if quick else 256) * 1024 * 1024
    image = bytearray(size)
    for off in range(0, size, 4 * 4096):
        image[off + 17] = 1
    image = bytes(image)
    gb = size / 1e9
    rows.append(("zero-page scan", "GB/s", *_median_rates(lambda: zeropages_pure.zero_pages(image, 4096),
                                                         lambda: zeropages.zero_pages(image, 4096),
                                                         units=gb, repeats=repeats)))
    return rows, upb_rows


def _upb_fields(vm: cache_pb2.GrpcVM) -> tuple[object, ...]:
    return (vm.id, vm.hypervisor, vm.proxyPid, vm.proxyURL, vm.cpu, vm.memory, vm.cpuDelta)


async def run(bench: runner.Bench, section: common.Section) -> None:
    # CPU-bound and synchronous: nothing else runs in the loop meanwhile, by design.
    rows, upb_rows = measure(bench.quick)
    fmt = {"msg/s": lambda v: f"{v:,.0f}", "GB/s": lambda v: f"{v:.2f}"}
    section.tables.append(common.Table(
        f"Native hot paths: Cython vs pure-Python twin (median of {3 if bench.quick else 7})",
        ["hot path", "unit", "pure Python", "Cython", "speed-up"],
        [[label, unit, fmt[unit](pure), fmt[unit](fast), f"{fast / pure:.1f}x"] for label, unit, pure, fast in rows]))
    section.data["rows"] = [{"hot_path": label, "unit": unit, "pure": pure, "cython": fast, "speedup": fast / pure}
                            for label, unit, pure, fast in rows]
    backend = api_implementation.Type()
    section.tables.append(common.Table(
        f"GrpcVM codec: Cython vs protobuf's own message classes ({backend} backend), same messages",
        ["codec path", f"protobuf ({backend})", "Cython", "speed-up"],
        [[label, f"{upb:,.0f}", f"{fast:,.0f}", f"{fast / upb:.1f}x"] for label, upb, fast in upb_rows]))
    section.data["vs_protobuf"] = {"backend": backend, "rows": [
        {"codec_path": label, "protobuf": upb, "cython": fast, "speedup": fast / upb} for label, upb, fast in upb_rows]}
    slowest = min(rows, key=lambda r: r[3] / r[2])
    section.targets.append(common.Target("native speed-up (slowest hot path)", slowest[3] / slowest[2], ">=",
                                         SPEEDUP_GOAL, "x", slowest[0]))
    slowest_upb = min(upb_rows, key=lambda r: r[2] / r[1])
    section.targets.append(common.Target(f"codec speed-up over protobuf {backend} (slowest path)",
                                         slowest_upb[2] / slowest_upb[1], ">=", UPB_SPEEDUP_GOAL, "x",
                                         slowest_upb[0]))
    section.panels.append(("native: Cython speed-up over pure Python", lambda ax: _plot(ax, rows)))


def _plot(ax, rows) -> None:
    labels = [r[0] for r in rows]
    speedups = [r[3] / r[2] for r in rows]
    bars = ax.bar(labels, speedups, color="#37b")
    ax.axhline(SPEEDUP_GOAL, color="#b33", linestyle="--", linewidth=1, label=f"goal {SPEEDUP_GOAL:g}x")
    ax.set_ylabel("speed-up (x)")
    ax.legend(fontsize=8)
    for bar, value in zip(bars, speedups):
        ax.annotate(f"{value:.1f}x", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8)


SPEC = runner.Spec("native", "6. Native hot paths", run)

if __name__ == "__main__":
    runner.run("native", [SPEC])
