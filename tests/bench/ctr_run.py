"""`ctr run` through a private containerd (its runc shim driving the installed kata-runtime), for
the sandbox benchmark's VMCache row: the same server, pool and configuration the `kata-runtime run`
rows use, reached through $KATA_CONF_FILE in containerd's environment.

Each timed run is `ctr run --rm <busybox> <id> echo hello`, timed from spawning ctr to its first
stdout line and to its exit. `--rm` deletes the container before ctr exits, so the factory path of
a timed run is read from the server's side: `factory status --json` counts the VMs it handed out,
and a run that took none did not come from the pool. The runtime's phase annotation
(io.katacontainers.timing.ms) lives only as long as the container, so the phases come from
detached probe runs (`ctr run -d`, `kata-runtime state`, then kill and delete), which also warm up
containerd's image and snapshot paths before the timed runs. containerd's events split each timed
run's wait for its first line into containerd's, the shim's and the runtime's parts (ctr_events).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from hostos import mounts
from tests.bench import common, ctr_events
from tests.integration import containerd
from tests.integration.containerd import Containerd
from tests.integration.vmtest import mounts_under, wait_for

# Runfiles: this file is <runfiles>/<workspace>/tests/bench/; install and the image are data deps.
WORKSPACE = Path(__file__).parent.parent.parent
INSTALL = WORKSPACE / "tools" / "install"
IMAGE_ARCHIVE = WORKSPACE / containerd.IMAGE_ARCHIVE
# Copying the programs and compiling their bytecode: seconds; a loaded machine gets slack.
INSTALL_TIMEOUT_S = 300.0
# A probe's task is killed and reaped in seconds unless the runtime hangs.
TASK_TIMEOUT_S = 60.0
# What the probe container runs until it is killed: long enough to never end on its own.
PROBE_COMMAND = ("sleep", "1000")
EXPECTED_LINE = "hello\n"
# containerd delivers a run's events to the subscriber within milliseconds of ctr's exit; a loaded
# machine gets slack, and a run whose events do not arrive just has no phase split.
EVENTS_TIMEOUT_S = 5.0
EVENTS_POLL_S = 0.05


class CtrRun:
    """kata-runtime installed under `root`, a containerd under `root` running it with the VMCache
    configuration `config`; `handed_out` reads the server's count of VMs handed out."""

    def __init__(self, root: str, config: str, handed_out: Callable[[], int]) -> None:
        self.root = root
        self.config = config
        self.handed_out = handed_out
        self.prefix = os.path.join(root, "usr")
        self.runtime = os.path.join(self.prefix, "bin", "kata-runtime")
        self.daemon: Containerd | None = None
        self.events: ctr_events.Subscriber | None = None
        self._n = 0

    # ---- setup and teardown ----------------------------------------------------------------------

    def start(self) -> None:
        done = subprocess.run([str(INSTALL), "--prefix", self.prefix, "--sysconfdir", os.path.join(self.root, "etc")],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"tools/install into {self.prefix}: exit {done.returncode}: "
                               f"{done.stderr.strip()[-400:]}")
        # render_config reads deploy/containerd/config.toml relative to the runfiles root,
        # which is the working directory `bazel run` gives.
        if not os.path.exists(containerd.CONFIG):
            raise RuntimeError(f"{containerd.CONFIG} not found in {os.getcwd()}: run the benchmark with `bazel run`")
        rendered = containerd.render_config(os.path.join(self.root, "containerd.toml"), self.prefix)
        self.daemon = Containerd(os.path.join(self.root, "ctrd"), rendered, env={"KATA_CONF_FILE": self.config},
                                 runtime=self.runtime)
        self.daemon.start()
        self.daemon.import_image(str(IMAGE_ARCHIVE))
        self.events = ctr_events.Subscriber([containerd.CTR, "--address", self.daemon.address, "events"],
                                            os.path.join(self.root, "events.log"), self.daemon.env)

    def stop(self) -> list[str]:
        """Deletes leftover containers and tasks, stops containerd and its shims, then deletes through
        the runtime what containerd could not (a container whose create a Ctrl-C cut short: its VM
        and shim) and unmounts its rootfs; returns what had leaked."""
        if self.events is not None:
            self.events.stop()
            self.events = None
        if self.daemon is None:
            return []
        daemon, self.daemon = self.daemon, None
        leaks = daemon.stop()
        leaks += self._delete_runtime_state(daemon)
        for mountpoint in sorted(mounts_under(daemon.root), key=len, reverse=True):  # nested ones first
            leaks.append(f"mount {mountpoint}")
            mounts.unmount_lazy(mountpoint)
        if leaks:
            common.log("ctr run: containerd left (cleaned up): " + "; ".join(leaks))
        return leaks

    def _delete_runtime_state(self, daemon: Containerd) -> list[str]:
        state = os.path.join(daemon.runc_root, containerd.NAMESPACE)
        ids = [name for name in os.listdir(state) if not name.endswith(".lock")] if os.path.isdir(state) else []
        for cid in ids:
            subprocess.run([self.runtime, "--root", state, "delete", "--force", cid], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=containerd.CLEANUP_TIMEOUT_S, env=daemon.env)
        return [f"runtime state of {cid} (deleted with kata-runtime delete --force)" for cid in ids]

    def _ctrd(self) -> Containerd:
        if self.daemon is None:
            raise RuntimeError("containerd is not running: call start() first")
        return self.daemon

    # ---- runs ------------------------------------------------------------------------------------

    def timed_run(self) -> dict[str, Any]:
        """One `ctr run --rm ... echo hello`: ms to the first stdout line and to exit, factory path."""
        ctrd = self._ctrd()
        self._n += 1
        cid = f"ctr{self._n}"
        before = self.handed_out()
        with open(os.path.join(self.root, f"{cid}.stderr"), "w+") as err:
            spawned = time.time()  # the events' clock: wall time
            start = time.perf_counter()
            proc = subprocess.Popen(ctrd.run_argv(cid, "echo", "hello"), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=err, text=True, env=ctrd.env)
            try:
                first = proc.stdout.readline() if proc.stdout else ""
                first_ms = (time.perf_counter() - start) * 1000
                code = proc.wait(containerd.CTR_TIMEOUT_S)
                total_ms = (time.perf_counter() - start) * 1000
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if proc.stdout:
                    proc.stdout.close()
            err.seek(0)
            stderr = err.read()
        if code != 0 or first != EXPECTED_LINE:
            raise RuntimeError(f"ctr run {cid}: exit {code}, first line {first!r}; stderr: {stderr.strip()[-400:]}; "
                               f"containerd: {ctrd.log()[-400:]}")
        taken = self.handed_out() - before
        path = "vmcache" if taken == 1 else f"{taken} VMs from the pool"
        return {"first_ms": first_ms, "total_ms": total_ms, "path": path,
                "phases": ctr_events.phases(self._events_of(cid), spawned, first_ms)}

    def _events_of(self, cid: str) -> dict[str, float]:
        """The run's milestones as containerd published them, once they have all arrived (bounded)."""
        deadline = time.monotonic() + EVENTS_TIMEOUT_S
        while self.events is not None:
            seen = self.events.read().get(cid, {})
            if all(topic in seen for topic, _ in ctr_events.MILESTONES) or time.monotonic() > deadline:
                return seen
            time.sleep(EVENTS_POLL_S)
        return {}

    def probe_phases(self) -> dict[str, Any]:
        """A detached run, untimed: the factory path and phases the runtime annotated its state with."""
        ctrd = self._ctrd()
        self._n += 1
        cid = f"probe{self._n}"
        started = ctrd.run(cid, *PROBE_COMMAND, detach=True)
        try:
            if started.returncode != 0:
                raise RuntimeError(f"ctr run -d {cid}: exit {started.returncode}: {started.stderr.strip()[-400:]}")
            # The state containerd's shim keeps through the runtime: --root <runc root>/<namespace>.
            state = subprocess.run([self.runtime, "--root", os.path.join(ctrd.runc_root, containerd.NAMESPACE),
                                    "state", cid], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                   timeout=TASK_TIMEOUT_S, env=ctrd.env)
            if state.returncode != 0:
                raise RuntimeError(f"kata-runtime state {cid}: exit {state.returncode}: {state.stderr.strip()[-400:]}")
            annotations = json.loads(state.stdout).get("annotations", {})
        finally:
            ctrd.ctr("task", "kill", "--signal", "SIGKILL", cid)
            wait_for(f"task {cid} to stop", lambda: ctrd.task_status(cid) in ("STOPPED", ""), TASK_TIMEOUT_S)
            ctrd.ctr("task", "delete", cid)
            ctrd.ctr("container", "delete", cid)
        try:
            phases = json.loads(annotations.get("io.katacontainers.timing.ms", "{}"))
        except ValueError:
            phases = {}
        return {"path": annotations.get("io.katacontainers.factory.path", "?"),
                "phases": {str(k): float(v) for k, v in phases.items() if isinstance(v, (int, float))}}
