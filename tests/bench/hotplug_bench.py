"""Hotplug: growing a running VM (a template clone from get_vm, 1 vCPU and
512 MiB) by +1 vCPU, +256 MiB and +2 vCPU +1 GiB, a fresh VM per run:

- QMP: the hotplug calls themselves (VM.add_cpus / VM.add_memory);
- online: from there until the guest reports it: the agent's
  online_cpu_mem(wait) and then get_guest_details until online CPUs and
  MemTotal show the addition (memory blocks may arrive after the reply).

bazel run //tests/bench:hotplug [-- --quick]
"""
from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from factory.factory import FactoryConfig, Mode, new_factory
from tests.bench import common, runner

SCENARIOS = [("+1 vCPU", 1, 0), ("+256 MiB", 0, 256), ("+2 vCPU +1 GiB", 2, 1024)]
# The guest's MemTotal grows by a little less than the DIMM (e.g. the block memmap);
# seeing this share of it counts as online.
MEMORY_SEEN_SHARE = 0.9
ONLINE_TIMEOUT_S = 30.0
POLL_S = 0.005


async def _one(factory, request, cpus: int, mib: int) -> dict[str, float]:
    vm = await factory.get_vm(request)
    try:
        before = await vm.agent.get_guest_details()
        start = time.perf_counter()
        if cpus:
            added = await vm.add_cpus(cpus)
            if added != cpus:
                raise RuntimeError(f"only {added} of {cpus} vCPUs could be hot-plugged")
        if mib:
            await vm.add_memory(mib)
        plugged = time.perf_counter()
        await vm.agent.online_cpu_mem(nb_cpus=vm.cpu, wait=True)
        replied = time.perf_counter()
        want_kib = before.mem_total_kib + int(mib * 1024 * MEMORY_SEEN_SHARE)
        while True:
            details = await vm.agent.get_guest_details()
            if details.online_cpus >= vm.cpu and details.mem_total_kib >= want_kib:
                break
            if time.perf_counter() - plugged > ONLINE_TIMEOUT_S:
                raise TimeoutError(f"guest shows {details.online_cpus} CPUs / {details.mem_total_kib} KiB after "
                                   f"{ONLINE_TIMEOUT_S:.0f} s; expected {vm.cpu} / ≥ {want_kib}")
            await asyncio.sleep(POLL_S)
        online = time.perf_counter()
        return {"qmp_ms": (plugged - start) * 1000, "online_reply_ms": (replied - plugged) * 1000,
                "online_ms": (online - plugged) * 1000, "total_ms": (online - start) * 1000,
                "mem_added_kib": details.mem_total_kib - before.mem_total_kib}
    finally:
        await vm.stop()


async def run(bench: runner.Bench, section: common.Section) -> None:
    repeats = 3 if bench.quick else 7
    root = bench.dir("hotplug")
    request = bench.vm_config()
    results: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in SCENARIOS}
    section.data["runs"] = results
    factory = await new_factory(FactoryConfig(mode=Mode.TEMPLATE, template_path=os.path.join(root, "template"),
                                              vm_config=request, run_root=os.path.join(root, "vm")))
    try:
        for label, cpus, mib in SCENARIOS:
            for _ in range(repeats):
                results[label].append(await _one(factory, request, cpus, mib))
            common.log(f"hotplug: {label} done")
    finally:
        await factory.close()
        _report(section, results)


def _report(section: common.Section, results: dict[str, list[dict[str, Any]]]) -> None:
    rows = []
    for label, runs in results.items():
        if not runs:
            continue
        stat = {k: common.summary([r[k] for r in runs]) for k in ("qmp_ms", "online_reply_ms", "online_ms", "total_ms")}
        rows.append([label, str(len(runs)), common.fmt_ms(stat["qmp_ms"]["p50"]), common.fmt_ms(stat["qmp_ms"]["p90"]),
                     common.fmt_ms(stat["online_reply_ms"]["p50"]), common.fmt_ms(stat["online_ms"]["p50"]),
                     common.fmt_ms(stat["online_ms"]["p90"]), common.fmt_ms(stat["total_ms"]["p50"])])
    section.tables.append(common.Table(
        "Hotplug into a running clone (1 vCPU, 512 MiB)",
        ["hotplug", "runs", "QMP p50", "QMP p90", "online_cpu_mem reply p50", "guest shows it p50",
         "guest shows it p90", "total p50"], rows,
        "QMP = device_add calls (CPU: one per vCPU; memory: object-add + device_add); 'guest shows it' = "
        "from the last QMP call until get_guest_details reports the CPUs online and MemTotal grown."))
    section.panels.append(("hotplug: QMP vs guest online (p50 ms)", lambda ax: _plot(ax, results)))


def _plot(ax, results) -> None:
    labels = [label for label, runs in results.items() if runs]
    qmp = [common.percentile([r["qmp_ms"] for r in results[k]], 50) for k in labels]
    online = [common.percentile([r["online_ms"] for r in results[k]], 50) for k in labels]
    ax.bar(labels, qmp, label="QMP hotplug calls", color="#37b")
    ax.bar(labels, online, bottom=qmp, label="until the guest shows it", color="#3a6")
    ax.set_ylabel("ms")
    ax.legend(fontsize=8)


SPEC = runner.Spec("hotplug", "4. Hotplug", run)

if __name__ == "__main__":
    runner.run("hotplug", [SPEC])
