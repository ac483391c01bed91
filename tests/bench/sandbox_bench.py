"""Sandbox start: `kata-runtime run` of `echo hello` in a busybox bundle, per
factory path, as a user runs it (the runtime binary, a fresh process per run):

- direct: no template, no cache: the VM boots now;
- template: `enable_template = true`; the first run creates the template
  (not timed), every timed run clones it;
- VMCache: the server binary with `vm_cache_number = 2`; before each run we
  wait until `kata-runtime factory status` lists 2 `VM pid` lines;
- `ctr run` with the same server, pool and configuration: a private containerd
  whose runc shim drives the installed kata-runtime (tests/bench/ctr_run.py).

Each run is timed to the first stdout line (the container's output) and to the
exit of `kata-runtime run` (Popen.wait). The pipe is never read to EOF: the
runtime's detached shim inherits stdout and would hold it open.

bazel run //tests/bench:sandbox [-- --quick]
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from runtime.warm import address
from tests.bench import common, runner
from tests.bench.ctr_run import CtrRun
from tests.bench.vmcache_server import VMCacheServer
from tests.integration import containerd
from tests.integration.bundles import make_bundle
from tests.integration.vmtest import write_config

# Runfiles: this file is <runfiles>/<workspace>/tests/bench/; the runtime is a data dependency.
RUNTIME = Path(__file__).parent.parent.parent / "runtime" / "kata-runtime"
POOL = 2
# Issue 16's goals, p50: `kata-runtime run` to the first output line per factory path, `ctr run`
# through containerd with a VMCache, and the guest's create_process phase.
GOALS_MS = {"vmcache": 150, "template": 400, "ctr_vmcache": 300, "create_process": 30}
# What the report says when the sandbox benchmark stopped before reaching the `ctr run` row.
CTR_RUN_SKIPPED = "not measured: the benchmark stopped before it"
RUN_TIMEOUT_S = 300.0
STATUS_TIMEOUT_S = 180.0
# The `ctr run` row's key in the tables and JSON, beside the STRATEGIES' keys.
CTR_KEY = "ctr_vmcache"
STRATEGIES = [  # key, label, expected factory path
    ("direct", "direct boot", "direct"),
    ("template", "template clone", "template"),
    ("vmcache", f"VMCache (server, pool {POOL})", "vmcache"),
    ("vmcache_cold", f"VMCache (server, pool {POOL}), cold command line", "vmcache"),
]
# The row measured with KATA_RUNTIME_WARM=0: every command a fresh interpreter (runtime/warm/).
COLD_KEY = "vmcache_cold"
_DEBUG_LINE = re.compile(r"factory path (?P<path>.+?), phases \(ms\) (?P<phases>.*)$")
_TIMING_LINE = re.compile(r"create began and ended at \(unix s\) (?P<times>\{.*\})$")
# The runtime's program directory in this benchmark's runfiles (where its warm server is keyed).
RUNTIME_PROGRAM = str(RUNTIME.parent.parent)


def _write_config(root: str, initrd_path: str, template: bool) -> str:
    """Direct or template config, everything under `root` (VMCache uses VMCacheServer's)."""
    return write_config(root, template, 0, common.BENCH_MEMORY_MIB, common.BENCH_MAX_VCPUS,
                        initrd_path, common.BENCH_DIAL_TIMEOUT_S)


class Runtime:
    def __init__(self, root: str, config: str) -> None:
        self.root = root
        self.config = config
        self.base = [str(RUNTIME), "--root", os.path.join(root, "state"), "--config", config]
        self._n = 0

    def call(self, *args: str, timeout: float = 120) -> tuple[int, str, str]:
        # Files, not pipes: a detached shim could hold captured pipes open.
        with open(os.path.join(self.root, "out"), "w+") as out, open(os.path.join(self.root, "err"), "w+") as err:
            code = subprocess.run(self.base + list(args), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                  timeout=timeout).returncode
            out.seek(0)
            err.seek(0)
            return code, out.read(), err.read()

    def warm_up(self) -> None:
        """Starts this root's warm server as any earlier command would (runtime/warm/), and waits
        until it listens: the timed runs are a user's second and later commands."""
        deadline = time.monotonic() + STATUS_TIMEOUT_S
        state_root = os.path.join(self.root, "state")
        os.makedirs(state_root, exist_ok=True)  # a server serves an existing root (its first create makes it)
        path = address.socket_path(state_root, RUNTIME_PROGRAM)
        while not os.path.exists(path):
            self.call("list")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the runtime's warm server did not start within {STATUS_TIMEOUT_S:.0f} s")
            time.sleep(0.1)

    def vm_pids(self) -> int:
        code, out, _ = self.call("factory", "status")
        return sum(1 for line in out.splitlines() if "VM pid" in line) if code == 0 else 0

    def timed_run(self, bundle: str, cold: bool = False) -> dict[str, Any]:
        """One `run`: ms to the first stdout line and to exit, the factory path and phases.
        `cold`: with the warm runtime off (KATA_RUNTIME_WARM=0)."""
        self._n += 1
        cid = f"bench{self._n}"
        err_path = os.path.join(self.root, f"{cid}.stderr")
        env = dict(os.environ, KATA_RUNTIME_WARM="0") if cold else None
        with open(err_path, "w+") as err:
            start_unix = time.time()
            start = time.perf_counter()
            proc = subprocess.Popen(self.base + ["--debug", "run", cid, "--bundle", bundle], env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True)
            try:
                first = proc.stdout.readline()
                first_ms = (time.perf_counter() - start) * 1000
                first_unix = start_unix + first_ms / 1000
                code = proc.wait(RUN_TIMEOUT_S)
                total_ms = (time.perf_counter() - start) * 1000
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                proc.stdout.close()  # not read to EOF: the shim may still hold the write end
                self.call("delete", "--force", cid)  # run deletes already; be safe
            err.seek(0)
            stderr = err.read()
        if code != 0 or first != "hello\n":
            raise RuntimeError(f"kata-runtime run {cid}: exit {code}, first line {first!r}; "
                               f"stderr: {stderr.strip()[-400:]}")
        path, phases, run_phases = "?", {}, {}
        for line in stderr.splitlines():
            match = _DEBUG_LINE.search(line)
            if match:
                path = match.group("path")
                phases = _parse_phases(match.group("phases"))
            timing = _TIMING_LINE.search(line)
            if timing:
                run_phases = _run_phases(json.loads(timing.group("times")), phases, start_unix, first_unix)
        return {"first_ms": first_ms, "total_ms": total_ms, "path": path, "phases": phases,
                "run_phases": run_phases}


def _run_phases(times: dict[str, float], create: dict[str, float], start_unix: float,
                first_unix: float) -> dict[str, float]:
    """Where a `run` waited for its first line: until the shim began creating (the command line,
    warm or cold, and the shim's start), create's own phases, then from created to the first line
    on the host (start, the process's exec in the guest, its output relayed)."""
    out = {"command line to shim create": (times["began"] - start_unix) * 1000}
    out.update(create)
    out["created to first output line"] = (first_unix - times["created"]) * 1000
    return out


def _parse_phases(text: str) -> dict[str, float]:
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
            if isinstance(value, str):
                value = json.loads(value)
            if isinstance(value, dict):
                return {str(k): float(v) for k, v in value.items() if isinstance(v, (int, float))}
        except (ValueError, SyntaxError, TypeError):
            pass
    return {}


def _wait_vm_pids(rt: Runtime, server: VMCacheServer, count: int) -> float:
    start = time.monotonic()
    while rt.vm_pids() < count:
        if server.proc is not None and server.proc.returncode is not None:
            raise RuntimeError(f"VMCache server exited with {server.proc.returncode}:\n{server.output()}")
        if time.monotonic() - start > STATUS_TIMEOUT_S:
            raise TimeoutError(f"factory status: fewer than {count} VMs after {STATUS_TIMEOUT_S:.0f} s:\n"
                               f"{server.output()}")
        time.sleep(0.05)
    return time.monotonic() - start


def _measure(rt: Runtime, bundle: str, runs: int, key: str, expected: str,
             samples: dict[str, list[dict[str, Any]]], before=None, cold: bool = False) -> None:
    for i in range(runs):
        if before is not None:
            before()
        common.log(f"sandbox: {key} run {i + 1}/{runs}")
        result = rt.timed_run(bundle, cold=cold)
        if result["path"] != expected:
            raise RuntimeError(f"{key}: expected factory path {expected!r}, got {result['path']!r}")
        samples[key].append(result)


async def run(bench: runner.Bench, section: common.Section) -> None:
    direct_runs, other_runs = (2, 5) if bench.quick else (3, 10)
    root = bench.dir("sandbox")
    bundle = make_bundle(os.path.join(root, "bundle"), ["echo", "hello"])
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k, _, _ in STRATEGIES}
    extra: dict[str, Any] = {}
    section.data.update(runs=samples, extra=extra)
    try:
        # direct
        d_root = os.path.join(root, "direct")
        os.makedirs(d_root)
        direct = Runtime(d_root, _write_config(d_root, bench.initrd_path, template=False))
        try:
            direct.warm_up()
            _measure(direct, bundle, direct_runs, "direct", "direct", samples)
        finally:
            direct.call("factory", "destroy")

        # template: the first run creates it, untimed
        t_root = os.path.join(root, "template")
        os.makedirs(t_root)
        template = Runtime(t_root, _write_config(t_root, bench.initrd_path, template=True))
        try:
            common.log("sandbox: creating the template (first run)")
            created = template.timed_run(bundle)
            if created["path"] != "template (created)":
                raise RuntimeError(f"template: first run took factory path {created['path']!r}")
            extra["template_first_run_ms"] = created["total_ms"]
            template.warm_up()
            _measure(template, bundle, other_runs, "template", "template", samples)
        finally:
            template.call("factory", "destroy")

        # VMCache: the server binary, the runtime with the server's own config
        server = VMCacheServer(os.path.join(root, "vmcache"), POOL, bench.initrd_path)
        cache = Runtime(server.root, server.config_path)
        try:
            await server.start()
            extra["vmcache_start_s"] = _wait_vm_pids(cache, server, POOL)
            cache.warm_up()
            _measure(cache, bundle, other_runs, "vmcache", "vmcache", samples,
                     before=lambda: _wait_vm_pids(cache, server, POOL))
            _measure(cache, bundle, other_runs, COLD_KEY, "vmcache", samples,
                     before=lambda: _wait_vm_pids(cache, server, POOL), cold=True)
            await measure_ctr_run(bench, root, cache, server, other_runs, extra)
        finally:
            await server.stop()
            cache.call("factory", "destroy")
    finally:
        _report(section, samples, extra)


def _handed_out(rt: Runtime) -> int:
    """How many VMs the VMCache server has handed out, as `factory status --json` says."""
    code, out, err = rt.call("factory", "status", "--json")
    if code != 0:
        raise RuntimeError(f"kata-runtime factory status --json: exit {code}: {err.strip()[-400:]}")
    return int(json.loads(out).get("vm_cache", {}).get("pool", {}).get("vms_handed_out", 0))


async def measure_ctr_run(bench: runner.Bench, root: str, cache: Runtime, server: VMCacheServer, runs: int,
                          extra: dict[str, Any]) -> None:
    """`ctr run` (containerd, its runc shim, the installed kata-runtime) with the VMCache server the
    `kata-runtime run` rows used: extra["ctr_run"] gets the timed runs, the phase probes and what
    leaked, filled as it goes; or why it was not measured (containerd not installed)."""
    skip = containerd.missing()
    if skip:
        extra["ctr_run"] = f"skipped: {skip}"
        return
    probes = 1 if bench.quick else 3
    result: dict[str, Any] = {"runs": [], "probes": [], "leaks": []}
    extra["ctr_run"] = result
    ctr = CtrRun(os.path.join(root, "ctr"), server.config_path, lambda: _handed_out(cache))
    try:
        common.log("sandbox: ctr run: installing kata-runtime, starting containerd")
        ctr.start()
        for i in range(probes):  # untimed; also warms up containerd's image and snapshot paths
            _wait_vm_pids(cache, server, POOL)
            common.log(f"sandbox: ctr run phase probe {i + 1}/{probes}")
            probe = ctr.probe_phases()
            if probe["path"] != "vmcache":
                raise RuntimeError(f"ctr run: expected factory path 'vmcache', got {probe['path']!r}")
            result["probes"].append(probe)
        for i in range(runs):
            _wait_vm_pids(cache, server, POOL)
            common.log(f"sandbox: ctr run {i + 1}/{runs}")
            timed = ctr.timed_run()
            if timed["path"] != "vmcache":
                raise RuntimeError(f"ctr run: expected a VM from the pool, got {timed['path']!r}")
            result["runs"].append(timed)
    finally:
        result["leaks"] = ctr.stop()  # before the server stops: containerd's tasks hold its VMs


def _phase_medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each phase's median over the runs (0 where a run lacks it), phases in first-seen order."""
    labels = dict.fromkeys(label for run in runs for label in run)
    return {label: common.percentile([run.get(label, 0.0) for run in runs], 50) for label in labels}


def _phase_rows(columns: dict[str, dict[str, float]]) -> list[list[str]]:
    """A phase table's rows: one per phase of any column, blank where a column lacks it."""
    labels = dict.fromkeys(label for medians in columns.values() for label in medians)
    return [[label] + [common.fmt_ms(m[label]) if label in m else "" for m in columns.values()] for label in labels]


def _report(section: common.Section, samples: dict[str, list[dict[str, Any]]], extra: dict[str, Any]) -> None:
    ctr = extra.get("ctr_run", CTR_RUN_SKIPPED)
    ctr_runs: list[dict[str, Any]] = ctr["runs"] if isinstance(ctr, dict) else []
    rows_by_key = [(k, label, runs) for k, label, _ in STRATEGIES for runs in [samples[k]]]
    rows_by_key.append((CTR_KEY, f"`ctr run` (containerd), VMCache (pool {POOL})", ctr_runs))
    stats = {k: {m: common.summary([r[m] for r in runs]) for m in ("first_ms", "total_ms")}
             for k, _, runs in rows_by_key}
    section.data["summary_ms"] = stats
    rows = [[label, str(stats[k]["first_ms"]["n"]),
             common.fmt_ms(stats[k]["first_ms"]["p50"]), common.fmt_ms(stats[k]["first_ms"]["p90"]),
             common.fmt_ms(stats[k]["total_ms"]["p50"]), common.fmt_ms(stats[k]["total_ms"]["p90"])]
            for k, label, _ in rows_by_key if stats[k]["first_ms"]["n"]]
    section.tables.append(common.Table(
        "Sandbox start: `kata-runtime run` (and `ctr run`) of `echo hello` in busybox",
        ["factory path", "runs", "first output p50", "first output p90", "exit p50", "exit p90"], rows,
        "First output: from spawning `kata-runtime --debug run` (or `ctr run --rm`) to the first stdout line; "
        "exit: to its exit (the container deleted and its VM stopped first). VMCache and `ctr run`: each run "
        f"waits until `factory status` lists {POOL} VMs; `ctr run` uses the same server and configuration, "
        "and each of its runs took one VM from the pool (the server's hand-out count)."))

    phase_runs = {k: [r["phases"] for r in samples[k] if r["phases"]] for k, _, _ in STRATEGIES}
    phase_runs[CTR_KEY] = [p["phases"] for p in ctr["probes"] if p["phases"]] if isinstance(ctr, dict) else []
    medians = {k: _phase_medians(runs) for k, runs in phase_runs.items()}
    section.data["phase_medians_ms"] = medians
    columns = {k: medians[k] for k in phase_runs if medians[k]}
    if columns:
        section.tables.append(common.Table(
            "Where `create` spends its time (median per phase, from `--debug`)", ["phase"] + list(columns),
            _phase_rows(columns),
            f"{CTR_KEY}: the runtime's io.katacontainers.timing.ms annotation of {len(phase_runs[CTR_KEY])} "
            "untimed `ctr run -d` probes before the timed runs (a `--rm` run's state is gone when it exits)."
            if phase_runs[CTR_KEY] else ""))

    run_medians: dict[str, dict[str, float]] = {}
    for k, _, _ in STRATEGIES:
        runs = [r["run_phases"] for r in samples[k] if r.get("run_phases")]
        if runs:
            run_medians[k] = {**_phase_medians(runs), "first output line": stats[k]["first_ms"]["p50"]}
    section.data["run_phase_medians_ms"] = run_medians
    if run_medians:
        section.tables.append(common.Table(
            "Where `kata-runtime run` waits for its first line (median per phase)", ["phase"] + list(run_medians),
            _phase_rows(run_medians),
            "command line to shim create: from spawning the command to the shim beginning create (the "
            "command line, warm: handed to the runtime's warm server, whose worker forks the shim; cold: a "
            "fresh interpreter importing the runtime, which forks the shim). Then create's phases (table above). "
            "created to first output line: the shim's answer, `start`, the process's exec in the guest and its "
            "output relayed to the host. Wall clocks of one host; medians per phase need not add up."))

    ctr_phases = [r["phases"] for r in ctr_runs if r.get("phases")]
    if ctr_phases:
        ctr_medians = _phase_medians(ctr_phases)
        section.data["ctr_phase_medians_ms"] = ctr_medians
        section.tables.append(common.Table(
            "Where `ctr run` waits for its first line (median per phase, from containerd's events)",
            ["phase", "ctr_vmcache"], [[label, common.fmt_ms(ms)] for label, ms in ctr_medians.items()],
            f"{len(ctr_phases)} timed runs; each phase ends at a containerd event (its publisher's clock) and "
            "starts at the previous one, the first at ctr's spawn; the last ends at the first output line. "
            "kata-runtime create includes the VM hand-out and create_process (table above); the shim runs "
            "kata-runtime create and start as two processes. The row in parentheses is not a phase: when "
            "containerd's /tasks/start event came, after /tasks/create."))

    if "template_first_run_ms" in extra:
        section.notes.append(f"first template run (creates the template, untimed): "
                             f"{common.fmt_ms(extra['template_first_run_ms'])}")
    if stats["vmcache"]["first_ms"]["n"] and stats[COLD_KEY]["first_ms"]["n"]:
        section.notes.append(
            "the rows but the cold one run with the runtime's warm server up (runtime/warm/: started by any "
            "earlier command on the state root, as on a user's machine after the first); the cold row sets "
            f"KATA_RUNTIME_WARM=0 (every command a fresh interpreter): cold : warm first output p50 = "
            f"{stats[COLD_KEY]['first_ms']['p50'] / stats['vmcache']['first_ms']['p50']:.2f}")
    if "vmcache_start_s" in extra:
        section.notes.append(f"VMCache server start to {POOL} VMs in `factory status`: "
                             f"{extra['vmcache_start_s']:.1f} s")

    def first_p50(key: str) -> float | None:
        return stats[key]["first_ms"]["p50"] if stats[key]["first_ms"]["n"] else None

    ctr_p50 = first_p50(CTR_KEY)
    if isinstance(ctr, dict) and ctr["leaks"]:
        section.notes.append("`ctr run`: containerd left (cleaned up): " + "; ".join(ctr["leaks"]))
    creates = [r["phases"]["create_process"] for k in ("vmcache", "template") for r in samples[k]
               if "create_process" in r["phases"]]
    section.targets += [
        common.Target("run to first output with VMCache p50", first_p50("vmcache"), "<=", GOALS_MS["vmcache"],
                      " ms", "`kata-runtime run`, echo hello"),
        common.Target("run to first output with a template clone p50", first_p50("template"), "<=",
                      GOALS_MS["template"], " ms", "`kata-runtime run`, echo hello"),
        common.Target("`ctr run` to first output with VMCache p50", ctr_p50, "<=", GOALS_MS["ctr_vmcache"], " ms",
                      "`ctr run --rm`, echo hello" if ctr_p50 is not None else str(ctr)),
        common.Target("process creation in the guest p50", common.percentile(creates, 50) if creates else None,
                      "<=", GOALS_MS["create_process"], " ms", "create_process phase, clone paths"),
    ]

    def draw(ax) -> None:
        keys = [(k, label) for k, label, _ in STRATEGIES if stats[k]["first_ms"]["n"]]
        xs = range(len(keys))
        for offset, metric, color in ((-0.2, "first_ms", "#37b"), (0.2, "total_ms", "#b73")):
            p50 = [stats[k][metric]["p50"] for k, _ in keys]
            p90 = [stats[k][metric]["p90"] for k, _ in keys]
            ax.bar([x + offset for x in xs], p50, width=0.4, color=color,
                   yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p90)]], capsize=4,
                   label="first output" if metric == "first_ms" else "exit")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([k for k, _ in keys])
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.axhline(GOALS_MS["vmcache"], color="k", linestyle="--", linewidth=1)
        ax.legend(fontsize=8)

    section.panels.append(("kata-runtime run (p50, whisker to p90; log scale; dashed: VMCache goal)", draw))


SPEC = runner.Spec("sandbox", "5. Sandbox start", run)

if __name__ == "__main__":
    runner.run("sandbox", [SPEC])
