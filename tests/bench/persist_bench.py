"""Template persistence: getting a template by booting one (and saving it to
disk) vs restoring the saved copy after its tmpfs copy is gone (a reboot),
and what the saved copy costs on disk.

- create: TemplateFactory.create with template_persist_path set and no saved
  copy: boot, pause, save device state, punch zero pages, write metadata,
  then the disk copy (its share is shown separately);
- restore: the same call once the tmpfs copy was removed: metadata check
  and a sparse copy back to tmpfs; then one clone proves it works.

bazel run //tests/bench:persist [-- --quick]
"""
from __future__ import annotations

import os
import shutil
import time

from factory import template_store
from factory.template import TemplateFactory
from tests.bench import common, runner


async def _one(config, root: str, index: int) -> dict[str, float]:
    tmpfs, store = os.path.join(root, f"template-{index}"), os.path.join(root, f"disk-{index}")
    run = os.path.join(root, "vm")
    started = time.perf_counter()
    created = await TemplateFactory.create(config, tmpfs, run, persist_path=store)
    create_s = time.perf_counter() - started
    await created.close()
    if created.persist_error:
        raise RuntimeError(created.persist_error)
    started = time.perf_counter()
    restored = await TemplateFactory.create(config, tmpfs, run, persist_path=store)
    restore_s = time.perf_counter() - started
    try:
        if not restored.restored_from:
            raise RuntimeError(f"template in {store} was booted again, not restored")
        vm = await restored.get_base_vm(config)
        try:
            await vm.resume()
            await vm.agent.check()
        finally:
            await vm.stop()
        started = time.perf_counter()
        # The save alone, timed on the same files (create's share of it).
        report = template_store.save(restored.path, restored.path.parent / f"resave-{index}")
        save_s = time.perf_counter() - started
        memory = os.stat(os.path.join(store, "memory"))
    finally:
        await restored.close()
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(os.path.join(root, f"resave-{index}"), ignore_errors=True)
    return {"create_ms": create_s * 1000, "restore_ms": restore_s * 1000, "save_ms": save_s * 1000,
            "disk_mib": report.disk_bytes / 2**20, "memory_size_mib": memory.st_size / 2**20}


async def run(bench: runner.Bench, section: common.Section) -> None:
    repeats = 2 if bench.quick else 5
    root = bench.dir("persist")
    config = bench.vm_config().valid()
    runs: list[dict[str, float]] = []
    section.data["runs"] = runs
    try:
        for index in range(repeats):
            runs.append(await _one(config, root, index))
            common.log(f"persist: run {index + 1}/{repeats} done")
    finally:
        _report(section, runs)


def _report(section: common.Section, runs: list[dict[str, float]]) -> None:
    if not runs:
        return
    stat = {k: common.summary([r[k] for r in runs]) for k in ("create_ms", "restore_ms", "save_ms")}
    disk, size = runs[-1]["disk_mib"], runs[-1]["memory_size_mib"]
    section.tables.append(common.Table(
        f"Template: boot and save vs restore from disk ({size:.0f} MiB guest)",
        ["path", "runs", "p50", "p90", "min", "max"],
        [[label, str(len(runs)), *(common.fmt_ms(stat[key][q]) for q in ("p50", "p90", "min", "max"))]
         for label, key in (("create (boot + save to disk)", "create_ms"), ("of which: save to disk", "save_ms"),
                            ("restore from disk", "restore_ms"))],
        f"On disk: {disk:.1f} MiB for a {size:.0f} MiB guest (memory sparse after zero-page punching, "
        "device state, metadata). 'save to disk' is timed alone on a restored template."))
    ratio = stat["create_ms"]["p50"] / stat["restore_ms"]["p50"]
    section.targets.append(common.Target("template restore faster than create (p50 ratio)", ratio, ">=", 1.0, "x",
                                         f"{common.fmt_ms(stat['restore_ms']['p50'])} vs "
                                         f"{common.fmt_ms(stat['create_ms']['p50'])}"))
    section.data["disk_mib"] = disk
    section.panels.append(("template: create vs restore (p50 ms)", lambda ax: _plot(ax, stat)))


def _plot(ax, stat) -> None:
    labels = ["create", "restore"]
    ax.bar(labels, [stat["create_ms"]["p50"], stat["restore_ms"]["p50"]], color=["#c63", "#3a6"])
    ax.set_ylabel("ms")


SPEC = runner.Spec("persist", "7. Template persistence", run)

if __name__ == "__main__":
    runner.run("persist", [SPEC])
