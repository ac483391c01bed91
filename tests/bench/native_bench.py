"""Cython vs pure-Python twin, measured side by side in one run.

bazel run //tests/bench:native [-- --quick]
The GrpcVM codec (messages/s) and the zero-page scan (GB/s), median of repeats.
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable

from native import vmstate, vmstate_pure, zeropages, zeropages_pure
from tests.bench import common, runner

_STATE = json.dumps({"id": "3f1c" * 9, "run_root": "/run/vc/vm", "pid": 123456, "pid_start_time": 987654,
                     "accelerator": "tcg", "num_vcpus": 2, "max_vcpus": 8, "memory_mib": 2304,
                     "max_memory_mib": 24000, "memory_slots": 10, "boot_from_template": True,
                     "hotplugged_cpus": ["cpu-0-1-0"], "hotplugged_memory": [{"id": "dimm1", "size_mib": 256}]},
                    sort_keys=True).encode()
_ARGS = ("3f1c" * 9, _STATE, 0, "", 2, 2304, 1)
# The target: every hot path at least this much faster in Cython.
SPEEDUP_GOAL = 5.0


def _rate(fn: Callable[[], None], units: float) -> float:
    start = time.perf_counter()
    fn()
    return units / (time.perf_counter() - start)


def _median_rates(pure: Callable[[], None], fast: Callable[[], None], units: float,
                  repeats: int) -> tuple[float, float]:
    """Pure and Cython alternate, so load from other processes hits both alike."""
    pure_rates, fast_rates = [], []
    for _ in range(repeats):
        pure_rates.append(_rate(pure, units))
        fast_rates.append(_rate(fast, units))
    return statistics.median(pure_rates), statistics.median(fast_rates)


def measure(quick: bool) -> list[tuple[str, str, float, float]]:
    """(hot path, unit, pure Python rate, Cython rate) rows."""
    repeats = 3 if quick else 7
    n = 20_000 if quick else 100_000
    encoded = vmstate_pure.encode_grpc_vm(*_ARGS)
    rows = []
    for label, pure, fast in [
        ("GrpcVM encode", lambda: [vmstate_pure.encode_grpc_vm(*_ARGS) for _ in range(n)],
         lambda: [vmstate.encode_grpc_vm(*_ARGS) for _ in range(n)]),
        ("GrpcVM decode", lambda: [vmstate_pure.decode_grpc_vm(encoded) for _ in range(n)],
         lambda: [vmstate.decode_grpc_vm(encoded) for _ in range(n)]),
    ]:
        rows.append((label, "msg/s", *_median_rates(pure, fast, n, repeats)))

    # A template-like image: mostly zero pages with a written page every fourth.
    size = (64 if quick else 256) * 1024 * 1024
    image = bytearray(size)
    for off in range(0, size, 4 * 4096):
        image[off + 17] = 1
    image = bytes(image)
    gb = size / 1e9
    rows.append(("zero-page scan", "GB/s", *_median_rates(lambda: zeropages_pure.zero_pages(image, 4096),
                                                         lambda: zeropages.zero_pages(image, 4096), gb, repeats)))
    return rows


async def run(bench: runner.Bench, section: common.Section) -> None:
    # CPU-bound and synchronous: nothing else runs in the loop meanwhile, by design.
    rows = measure(bench.quick)
    fmt = {"msg/s": lambda v: f"{v:,.0f}", "GB/s": lambda v: f"{v:.2f}"}
    section.tables.append(common.Table(
        f"Native hot paths: Cython vs pure-Python twin (median of {3 if bench.quick else 7})",
        ["hot path", "unit", "pure Python", "Cython", "speed-up"],
        [[label, unit, fmt[unit](pure), fmt[unit](fast), f"{fast / pure:.1f}x"] for label, unit, pure, fast in rows]))
    section.data["rows"] = [{"hot_path": label, "unit": unit, "pure": pure, "cython": fast, "speedup": fast / pure}
                            for label, unit, pure, fast in rows]
    slowest = min(rows, key=lambda r: r[3] / r[2])
    section.targets.append(common.Target("native speed-up (slowest hot path)", slowest[3] / slowest[2], ">=",
                                         SPEEDUP_GOAL, "x", slowest[0]))
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
