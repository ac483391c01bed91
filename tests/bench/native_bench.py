"""Cython vs pure-Python twin, measured side by side in one run.

bazel run //tests/bench:native [-- --quick]
Prints a Markdown table: the GrpcVM codec (messages/s) and the zero-page scan (GB/s).
"""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable

from absl import app, flags

from native import vmstate, vmstate_pure, zeropages, zeropages_pure

flags.DEFINE_bool("quick", False, "fewer repetitions")
FLAGS = flags.FLAGS

_STATE = json.dumps({"id": "3f1c" * 9, "run_root": "/run/vc/vm", "pid": 123456, "pid_start_time": 987654,
                     "accelerator": "tcg", "num_vcpus": 2, "max_vcpus": 8, "memory_mib": 2304,
                     "max_memory_mib": 24000, "memory_slots": 10, "boot_from_template": True,
                     "hotplugged_cpus": ["cpu-0-1-0"], "hotplugged_memory": [{"id": "dimm1", "size_mib": 256}]},
                    sort_keys=True).encode()
_ARGS = ("3f1c" * 9, _STATE, 0, "", 2, 2304, 1)


def _median_rate(fn: Callable[[], None], units: float, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        rates.append(units / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv) -> None:
    repeats = 3 if FLAGS.quick else 7
    n = 20_000 if FLAGS.quick else 100_000
    encoded = vmstate_pure.encode_grpc_vm(*_ARGS)
    rows = []
    for label, pure, fast, units, unit in [
        ("GrpcVM encode", lambda: [vmstate_pure.encode_grpc_vm(*_ARGS) for _ in range(n)],
         lambda: [vmstate.encode_grpc_vm(*_ARGS) for _ in range(n)], n, "msg/s"),
        ("GrpcVM decode", lambda: [vmstate_pure.decode_grpc_vm(encoded) for _ in range(n)],
         lambda: [vmstate.decode_grpc_vm(encoded) for _ in range(n)], n, "msg/s"),
    ]:
        rows.append((label, unit, _median_rate(pure, units, repeats), _median_rate(fast, units, repeats)))

    # A template-like image: mostly zero pages with a written page every fourth.
    size = (64 if FLAGS.quick else 256) * 1024 * 1024
    image = bytearray(size)
    for off in range(0, size, 4 * 4096):
        image[off + 17] = 1
    image = bytes(image)
    gb = size / 1e9
    rows.append(("zero-page scan", "GB/s", _median_rate(lambda: zeropages_pure.zero_pages(image, 4096), gb, repeats),
                 _median_rate(lambda: zeropages.zero_pages(image, 4096), gb, repeats)))

    print(f"native benchmark ({'quick' if FLAGS.quick else 'full'}; median of {repeats}; {os.cpu_count()} CPUs)\n")
    print("| hot path | unit | pure Python | Cython | speed-up |")
    print("|---|---|---:|---:|---:|")
    for label, unit, pure, fast in rows:
        fmt = (lambda v: f"{v:,.0f}") if unit == "msg/s" else (lambda v: f"{v:.2f}")
        print(f"| {label} | {unit} | {fmt(pure)} | {fmt(fast)} | {fast / pure:.1f}x |")


if __name__ == "__main__":
    app.run(main)
