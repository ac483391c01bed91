"""Memory density: what each VM costs the host with N VMs alive, directly
booted vs template clones, in one run; and what the zero-page punching saves
on the template's memory file.

Cost of one VM = (Σ over QEMUs of PSS − Pss_Shmem, + the template file's
allocated bytes once) / N. PSS divides shared pages among their users; the
clones' view of the template file is shmem, so it is taken out of each PSS
and the file counted once instead, whole (pages no clone touches cost too).

bazel run //tests/bench:memory [-- --quick]
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any, Iterator

from factory import memfile
from factory.factory import Factory, FactoryConfig, Mode, new_factory
from factory.vm import VM
from tests.bench import common, runner

MIB = 1024 * 1024
# VMs booting at once: two TCG guests per 2 cores keeps boots well inside the dial timeout.
BOOT_CONCURRENCY = 2
# After the last boot: let the guests go idle before reading PSS.
SETTLE_S = 2.0
STRATEGIES = ("direct", "template")
# Issue 16: a clone costs at most a tenth of a directly booted VM, with 10 of each alive.
DENSITY_GOAL_PCT = 10


def smaps_rollup_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


@contextlib.contextmanager
def punch_probe(record: dict[str, Any]) -> Iterator[None]:
    """Wraps the template's zero-page punch to read the file's allocation before and after."""
    original = memfile.punch_zero_pages

    def probed(path: str, *args, **kwargs):
        record["before"] = memfile.residency(path)
        start = time.perf_counter()
        report = original(path, *args, **kwargs)
        record["seconds"] = time.perf_counter() - start
        record["after"] = memfile.residency(path)
        record["pages_scanned"], record["zero_pages_freed"] = report.pages_scanned, report.zero_pages_freed
        record["mib_saved"] = report.mib_saved
        return report

    memfile.punch_zero_pages = probed
    try:
        yield
    finally:
        memfile.punch_zero_pages = original


async def _grow(factory: Factory, request, vms: list[VM], n: int) -> None:
    """Adds VMs (running, via get_vm) until `n` are alive."""
    gate = asyncio.Semaphore(BOOT_CONCURRENCY)

    async def one() -> None:
        async with gate:
            vm = await factory.get_vm(request)
            vms.append(vm)  # appended at once: stopped in the caller's finally, even if a sibling fails

    # Every boot finishes (or fails) before this returns, so none lands after the caller's cleanup.
    outcomes = await asyncio.gather(*(one() for _ in range(n - len(vms))), return_exceptions=True)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    if errors:
        raise errors[0]


def _measure(vms: list[VM], template_file: str | None) -> dict[str, Any]:
    per_vm = [smaps_rollup_kib(vm.hypervisor.state.pid) for vm in vms]
    template_bytes = memfile.residency(template_file)["allocated_bytes"] if template_file else 0
    pss = [m["Pss"] / 1024 for m in per_vm]
    own = sum(m["Pss"] - m.get("Pss_Shmem", 0) for m in per_vm) * 1024
    return {"n": len(vms), "pss_mib": pss, "pss_shmem_mib": [m.get("Pss_Shmem", 0) / 1024 for m in per_vm],
            "rss_mib": [m["Rss"] / 1024 for m in per_vm], "template_allocated_mib": template_bytes / MIB,
            "cost_per_vm_mib": (own + template_bytes) / MIB / len(vms)}


async def _levels(factory: Factory, request, levels: tuple[int, ...], template_file: str | None,
                  out: dict[int, dict[str, Any]], label: str) -> None:
    vms: list[VM] = []
    try:
        for n in levels:
            common.log(f"memory: {label}: {n} VMs")
            await _grow(factory, request, vms, n)
            await asyncio.sleep(SETTLE_S)
            out[n] = _measure(vms, template_file)
    finally:
        await asyncio.gather(*(vm.stop() for vm in vms), return_exceptions=True)


async def run(bench: runner.Bench, section: common.Section) -> None:
    # N = 10 in quick mode too: issue 16's density goal is stated at N = 10.
    levels = (1, 10) if bench.quick else (1, 5, 10)
    root = bench.dir("memory")
    run_root = os.path.join(root, "vm")
    request = bench.vm_config()
    results: dict[str, dict[int, dict[str, Any]]] = {s: {} for s in STRATEGIES}
    punch: dict[str, Any] = {}
    section.data.update(levels=list(levels), results=results, punch=punch, memory_mib=common.BENCH_MEMORY_MIB)
    try:
        direct = await new_factory(FactoryConfig(vm_config=request, run_root=run_root))
        await _levels(direct, request, levels, None, results["direct"], "direct")
        with punch_probe(punch):
            template = await new_factory(FactoryConfig(mode=Mode.TEMPLATE, template_path=os.path.join(root, "template"),
                                                       vm_config=request, run_root=run_root))
        try:
            await _levels(template, request, levels, str(template.base.memory_path), results["template"], "template")
        finally:
            await template.close()
    finally:
        _report(section, levels, results, punch)


def _report(section: common.Section, levels: tuple[int, ...], results: dict[str, dict[int, dict[str, Any]]],
            punch: dict[str, Any]) -> None:
    rows = []
    ratio_at: dict[int, float] = {}
    for n in levels:
        d, t = results["direct"].get(n), results["template"].get(n)
        if not d and not t:
            continue
        if d and t:
            ratio_at[n] = t["cost_per_vm_mib"] / d["cost_per_vm_mib"] * 100
        rows.append([str(n),
                     f"{common.percentile(d['pss_mib'], 50):.0f}" if d else "–",
                     f"{d['cost_per_vm_mib']:.0f}" if d else "–",
                     f"{common.percentile(t['pss_mib'], 50):.0f}" if t else "–",
                     f"{t['template_allocated_mib']:.0f}" if t else "–",
                     f"{t['cost_per_vm_mib']:.0f}" if t else "–",
                     f"{ratio_at[n]:.0f} %" if n in ratio_at else "–"])
    section.tables.append(common.Table(
        f"Memory per VM with N VMs alive ({common.BENCH_MEMORY_MIB} MiB guests, running, idle {SETTLE_S:.0f} s)",
        ["N", "direct: PSS/QEMU p50 (MiB)", "direct: cost/VM (MiB)", "clone: PSS/QEMU p50 (MiB)",
         "template file allocated (MiB)", "clone: cost/VM (MiB)", "clone : direct"], rows,
        "cost/VM = (Σ(PSS − Pss_Shmem) + template file allocated) / N: the template file counted once, whole."))
    section.data["clone_direct_percent"] = ratio_at

    if punch.get("before"):
        before, after = punch["before"]["allocated_bytes"] / MIB, punch["after"]["allocated_bytes"] / MIB
        section.tables.append(common.Table(
            "Zero-page punching of the template memory file",
            ["file size", "allocated before", "allocated after", "pages scanned", "zero pages freed", "saved",
             "punch time"],
            [[f"{punch['before']['size_bytes'] / MIB:.0f} MiB", f"{before:.1f} MiB", f"{after:.1f} MiB",
              f"{punch['pages_scanned']:,}", f"{punch['zero_pages_freed']:,}",
              f"{before - after:.1f} MiB ({(before - after) / before * 100 if before else 0:.0f} %)",
              common.fmt_ms(punch["seconds"] * 1000)]]))

    if ratio_at:
        n = max(ratio_at)
        section.targets.append(common.Target("clone cost per VM vs direct", ratio_at[n], "<=", DENSITY_GOAL_PCT, " %",
                                             f"N = {n}; PSS" + ("" if n >= 10 else "; the goal is at N = 10")))
    section.panels.append(("memory cost per VM (MiB) vs VMs alive", lambda ax: _plot(ax, levels, results)))


def _plot(ax, levels, results) -> None:
    ns = [n for n in levels if n in results["direct"] or n in results["template"]]
    x = range(len(ns))
    width = 0.38
    direct = [results["direct"].get(n, {}).get("cost_per_vm_mib", 0) for n in ns]
    own = [(results["template"][n]["cost_per_vm_mib"] - results["template"][n]["template_allocated_mib"] / n)
           if n in results["template"] else 0 for n in ns]
    share = [results["template"][n]["template_allocated_mib"] / n if n in results["template"] else 0 for n in ns]
    ax.bar([i - width / 2 for i in x], direct, width, label="direct boot", color="#b33")
    ax.bar([i + width / 2 for i in x], own, width, label="clone: own pages", color="#37b")
    ax.bar([i + width / 2 for i in x], share, width, bottom=own, label="clone: template file / N", color="#9bd")
    ax.set_xticks(list(x), [f"N = {n}" for n in ns])
    ax.set_ylabel("MiB per VM")
    ax.legend(fontsize=8)


SPEC = runner.Spec("memory", "2. Memory density", run)

if __name__ == "__main__":
    runner.run("memory", [SPEC])
