"""Every benchmark, in order, in one process and one report (one set of targets,
one JSON, one chart): bazel run //tests/bench:all [-- --quick] [-- --out_dir DIR]

VM benchmarks run one after another, never side by side: on 2 cores two of
them at once would measure each other.
"""
from tests.bench import (
    hotplug_bench,
    memory_bench,
    native_bench,
    persist_bench,
    rpc_bench,
    runner,
    sandbox_bench,
    vm_ready_bench,
)

SPECS = [vm_ready_bench.SPEC, memory_bench.SPEC, rpc_bench.SPEC, hotplug_bench.SPEC, sandbox_bench.SPEC,
         native_bench.SPEC, persist_bench.SPEC]

if __name__ == "__main__":
    runner.run("all", SPECS)
