"""What every benchmark shares: the environment header, statistics, and the
report model (tables, targets) rendered as Markdown, JSON and a PNG chart.

A benchmark returns a Section; the runner renders one or more sections with
the environment on top, so `all` and a single benchmark print the same shape.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from factory import assets
from factory.config import DEFAULT_QEMU, AgentConfig, HypervisorConfig, VMConfig
from factory.hypervisor import accelerator
from factory.hypervisor.binary import qemu_version

# The size the integration tests and the VMCache example use: small guests
# keep ten VMs and their templates well inside a 24 GiB, 2-core machine.
BENCH_MEMORY_MIB = 512
BENCH_MAX_VCPUS = 4
# TCG boots take seconds, several at once on 2 cores much longer.
BENCH_DIAL_TIMEOUT_S = 90.0


def vm_config(initrd_path: str = "") -> VMConfig:
    """The VM every benchmark asks for (before valid(): get_vm validates it, as callers do)."""
    return VMConfig(hypervisor=HypervisorConfig(memory_mib=BENCH_MEMORY_MIB, max_vcpus=BENCH_MAX_VCPUS,
                                                initrd_path=initrd_path),
                    agent=AgentConfig(dial_timeout_s=BENCH_DIAL_TIMEOUT_S))


def pin_initrd(directory: str, attempts: int = 50) -> str:
    """A private copy of the built initramfs, so a rebuild of //guest:initramfs during a
    run (Bazel replaces the output file) cannot pull it from under a booting VM."""
    import shutil
    source = assets.default_initrd_path()
    target = os.path.join(directory, "initramfs.cpio.lz4")
    for attempt in range(attempts):
        try:
            shutil.copyfile(source, target)
            return target
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.1)  # being rewritten right now
    return target


# ---- environment -------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def foreign_qemus() -> list[str]:
    """QEMU processes already running: they compete for the 2 cores and skew timings."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]).startswith(b"qemu-system"):
            found.append(entry)
    return found


def environment() -> dict[str, Any]:
    accel = accelerator.choose("auto", DEFAULT_QEMU)
    kernel = assets.kernel_info()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(_meminfo_kib("MemTotal") / 1024 / 1024, 1),
        "host_kernel": platform.release(),
        "qemu": qemu_version(DEFAULT_QEMU),
        "accelerator": accel.name,
        "accelerator_reason": accel.reason,
        "guest_kernel": (f"{kernel.get('package', '?')} {kernel.get('version', '')} (PVH vmlinux)"
                         if kernel else "unknown (no kernel.json)"),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "other_qemu_processes": len(foreign_qemus()),
    }


def environment_markdown(env: dict[str, Any], mode: str) -> str:
    lines = [
        f"- machine: {env['cpu_model']}, {env['cores']} cores, {env['memory_gib']} GiB, "
        f"host kernel {env['host_kernel']}",
        f"- QEMU: {env['qemu']}",
        f"- accelerator: **{env['accelerator']}** ({env['accelerator_reason']})",
        f"- guest kernel: {env['guest_kernel']}",
        f"- mode: {mode}; {env['date']}; load average at start {env['load_average']}",
    ]
    if env["other_qemu_processes"]:
        lines.append(f"- **warning**: {env['other_qemu_processes']} QEMU process(es) not started by this benchmark "
                     "were running at start; they compete for the cores")
    return "\n".join(lines)


# ---- statistics ----------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and tail of repeated runs; p99 of fewer than 100 runs is close to the max."""
    if not values:
        return {"n": 0, "p50": math.nan, "p90": math.nan, "p99": math.nan, "min": math.nan, "max": math.nan}
    return {"n": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "min": min(values), "max": max(values)}


def fmt_ms(value: float) -> str:
    if value is None or math.isnan(value):
        return "–"
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    if value >= 100:
        return f"{value:.0f} ms"
    if value >= 10:
        return f"{value:.1f} ms"
    return f"{value:.2f} ms"


# ---- report model --------------------------------------------------------------


@dataclasses.dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""

    def markdown(self) -> str:
        out = [f"**{self.title}**", "", "| " + " | ".join(self.headers) + " |",
               "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.headers))) + "|"]
        out += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        if self.note:
            out += ["", self.note]
        return "\n".join(out)


@dataclasses.dataclass
class Target:
    name: str
    measured: float | None  # None: not measured in this run
    op: str  # "<=" or ">="
    goal: float
    unit: str = ""
    detail: str = ""  # what the measured value is, when not obvious

    @property
    def met(self) -> bool | None:
        if self.measured is None or math.isnan(self.measured):
            return None
        return self.measured <= self.goal if self.op == "<=" else self.measured >= self.goal

    def row(self) -> list[str]:
        mark = {True: "✓", False: "✗", None: "–"}[self.met]
        value = "not measured" if self.met is None else f"{_num(self.measured)}{self.unit}"
        goal = f"{'≤' if self.op == '<=' else '≥'} {_num(self.goal)}{self.unit}"
        return [self.name, value + (f" ({self.detail})" if self.detail else ""), goal, mark]


def _num(value: float) -> str:
    if value == int(value) and abs(value) >= 1:
        return f"{value:.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


@dataclasses.dataclass
class Section:
    key: str  # JSON key and file stem
    title: str
    tables: list[Table] = dataclasses.field(default_factory=list)
    targets: list[Target] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # raw numbers for the JSON
    # Chart panels: (title, draw(axes)); not serialised.
    panels: list[tuple[str, Callable[[Any], None]]] = dataclasses.field(default_factory=list)
    error: str = ""  # set when the benchmark failed part-way
    seconds: float = 0.0

    def markdown(self) -> str:
        out = [f"### {self.title}"]
        if self.error:
            out.append(f"**failed**: {self.error}")
        out += [t.markdown() for t in self.tables]
        out += [f"- {n}" for n in self.notes]
        return "\n\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "seconds": round(self.seconds, 1), "error": self.error,
                "tables": [dataclasses.asdict(t) for t in self.tables],
                "targets": [dict(dataclasses.asdict(t), met=t.met) for t in self.targets],
                "notes": self.notes, "data": self.data}


# Issue 16's targets table, in its order: these rows come first, whichever benchmark measured them.
ISSUE_TARGET_ORDER = (
    "run to first output with VMCache p50",
    "run to first output with a template clone p50",
    "`ctr run` to first output with VMCache p50",
    "template clone ready p50",
    "cache ready p50",
    "VMCache ready p50",
    "direct boot → agent answered p50",
    "GetBaseVM p50, 1 client",
    "process creation in the guest p50",
    "clone cost per VM vs direct",
)


def targets_table(sections: Iterable[Section]) -> Table:
    targets = [t for s in sections for t in s.targets]
    rank = {name: i for i, name in enumerate(ISSUE_TARGET_ORDER)}
    targets.sort(key=lambda t: rank.get(t.name, len(rank)))  # stable: the rest keep their order
    return Table("Targets", ["target", "measured", "goal", "met"], [t.row() for t in targets])


def render_markdown(env: dict[str, Any], mode: str, sections: list[Section], command: str) -> str:
    parts = [f"## kata-vmfactory benchmarks\n\n`{command}`", environment_markdown(env, mode)]
    if any(s.targets for s in sections):
        parts.append(targets_table(sections).markdown())
    parts += [s.markdown() for s in sections]
    return "\n\n".join(parts) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: Path, env: dict[str, Any], mode: str, sections: list[Section]) -> None:
    doc = {"environment": env, "mode": mode,
           "targets": [dict(dataclasses.asdict(t), met=t.met, section=s.key) for s in sections for t in s.targets],
           "sections": {s.key: s.to_json() for s in sections}}
    path.write_text(json.dumps(_jsonable(doc), indent=1, sort_keys=False) + "\n")


def write_chart(path: Path, sections: list[Section], subtitle: str) -> bool:
    """One PNG with every section's panels, two per row; False when there is nothing to draw."""
    panels = [p for s in sections for p in s.panels]
    if not panels:
        return False
    import matplotlib
    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.2 * rows), squeeze=False)
    for ax, (title, draw) in zip(axes.flat, panels):
        try:
            draw(ax)
        except Exception as err:  # one bad panel must not cost the others
            ax.text(0.5, 0.5, f"could not draw: {err}", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"kata-vmfactory benchmarks — {subtitle}", fontsize=11)
    try:
        fig.tight_layout()
    except Exception:  # e.g. a log axis with no data after an interrupted run: keep the default layout
        pass
    try:
        fig.savefig(path, dpi=110)
    except Exception as err:
        log(f"could not draw the chart: {err}")
        return False
    finally:
        plt.close(fig)
    return True


def default_out_dir() -> Path:
    """$BUILD_WORKING_DIRECTORY/bench-results under `bazel run`, else a fresh temp dir."""
    cwd = os.environ.get("BUILD_WORKING_DIRECTORY")
    if cwd:
        return Path(cwd) / "bench-results"
    import tempfile
    return Path(tempfile.mkdtemp(prefix="kvf-bench-results-"))


def log(message: str) -> None:
    """Progress goes to stderr so stdout stays the Markdown report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
