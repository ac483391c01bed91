"""Containers inside the guest, in real VMs: own namespaces, pivot_root, OCI defaults, and what a
container cannot reach (the agent's port, the 9p share root, the guest's root).

Attacks are run from inside a container; each has a control run uncontained (guest_root, what a
guest that escaped to its root would do) that shows the same probe does find its target there,
so a passing attack test is not a probe that could never succeed.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from factory.errors import AgentError
from factory.vm import VM
from tests.integration.bundles import make_bundle
from tests.integration.vmtest import GUEST_SHARED, SHARED_TAG, share_rootfs, write_config

EXTRA_APPLETS = ("head", "wc", "grep", "mknod", "mkdir", "readlink", "find", "kill", "ps", "stat", "ln", "rm")
# The host drops this file in the share's root: only the share root, never a container's rootfs.
SHARE_CANARY = "share-root-canary"
RUNTIME = "runtime/kata-runtime"
ESCAPE_PROGRAM = "tests/integration/escape/chroot_escape"


def _rootfs(vm: VM, container_id: str) -> str:
    rootfs, guest_path = share_rootfs(vm, container_id)
    for applet in EXTRA_APPLETS:
        os.symlink("/bin/busybox", rootfs / "bin" / applet)
    (rootfs / "container-marker").write_text("")
    (rootfs / "data").mkdir()
    (rootfs / "data" / "in-data").write_text("data\n")
    (vm.hypervisor.run.shared_writable_dir / SHARE_CANARY).write_text("")
    return guest_path


def _process(exec_id: str, script: str, rootfs: str, **overrides) -> dict:
    fields = dict(exec_id=exec_id, args=["sh", "-c", script], env=["PATH=/bin", "HOME=/"], cwd="/", uid=0, gid=0,
                  additional_gids=[], rootfs=rootfs)
    fields.update(overrides)
    return fields


async def _run(vm: VM, **process) -> tuple[str, str, int]:
    """Creates, starts and collects one process: (stdout, stderr, exit status)."""
    exec_id = process["exec_id"]
    await vm.agent.create_process(**process)
    await vm.agent.start_process(exec_id)
    return await _collect(vm, exec_id)


async def _collect(vm: VM, exec_id: str) -> tuple[str, str, int]:
    out = {1: b"", 2: b""}
    while True:
        event = await asyncio.wait_for(vm.agent.events.get(), 120)
        kind = event.WhichOneof("kind")
        if kind == "process_output" and event.process_output.exec_id == exec_id:
            out[event.process_output.stream] += event.process_output.data
        elif kind == "process_exited" and event.process_exited.exec_id == exec_id:
            return out[1].decode(), out[2].decode(), event.process_exited.exit_status


async def _clone(template, run_root) -> VM:
    vm = await VM.new(template, run_root)
    await vm.resume()
    await vm.agent.mount_shared(SHARED_TAG, GUEST_SHARED)
    return vm


def _fields(stdout: str) -> dict[str, str]:
    """`key=value` lines of a probe script."""
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


PROBES = r"""
echo urandom=$(head -c 16 /dev/urandom | wc -c)
echo proc1root=$(ls /proc/1/root/ | grep -c container-marker)
echo devices=$(ls /dev | grep -cxE 'null|zero|full|random|urandom|tty|console|ptmx|pts|shm')
echo pid1=$(cat /proc/1/comm)
echo canary=$(find / -path /proc -prune -o -path /sys -prune -o -name share-root-canary -print 2>/dev/null | wc -l)
echo shared=$(ls -d /run/kata-containers 2>/dev/null | wc -l)
echo vport=$(ls /dev | grep -c vport)
echo sysro=$(touch /sys/kernel/x 2>&1 | grep -c 'Read-only')
echo procsysro=$(sh -c 'echo 1 > /proc/sys/kernel/sysrq' 2>&1 | grep -c 'Read-only')
echo initcaps=$(grep -E '^Cap(Prm|Eff|Bnd)' /proc/1/status | tr -d ' \t' | tr '\n' ' ')
echo selfbnd=$(grep -E '^CapBnd' /proc/self/status | tr -d ' \t')
"""

# Reaches for the agent's virtio port through sysfs: its device number, a node made for it in
# each writable place, and an open of each. The agent holds the port open, so an open that gets
# through the filesystem fails with EBUSY: "busy" means the port was reached.
PORT_ATTACK = r"""
dev=$(cat /sys/class/virtio-ports/vport*/dev 2>/dev/null | head -n 1)
echo portdev=$dev
major=${dev%%:*}; minor=${dev##*:}
reached=0
for dir in DIRS; do
  if mknod $dir/vp c $major $minor 2>/dev/null; then
    why=$( (exec 3>$dir/vp) 2>&1 )
    case "$?:$why" in 0:*|*busy*) reached=$((reached + 1)); echo "reached=$dir $why" >&2;; esac
    rm -f $dir/vp
  fi
done
echo reached=$reached
"""


def test_a_container_sees_its_own_root_proc_and_default_devices_and_nothing_else(template, run_root):
    async def body():
        vm = await _clone(template, run_root)
        try:
            rootfs = _rootfs(vm, "c1")
            stdout, stderr, status = await _run(vm, **_process("c1", PROBES, rootfs))
            got = _fields(stdout)
            assert status == 0, stderr
            assert got["urandom"] == "16"
            assert got["proc1root"] == "1"  # /proc/1/root is the container's own root
            assert got["devices"] == "10"
            assert got["pid1"] == "vmf-contain"  # its init, not the guest's
            assert got["canary"] == "0" and got["shared"] == "0" and got["vport"] == "0"
            assert got["sysro"] == "1" and got["procsysro"] == "1"
            # The init (ptraceable by the container) holds no capability and bounds no more than it.
            assert got["initcaps"].split() == ["CapPrm:0000000000000000", "CapEff:0000000000000000", got["selfbnd"]]

            # Control: uncontained, the same probes find the share root and the guest's init.
            stdout, stderr, status = await _run(vm, **_process("g1", PROBES, "", guest_root=True))
            got = _fields(stdout)
            assert got["canary"] == "1" and got["shared"] == "1" and got["pid1"] == "init"
        finally:
            await vm.stop()
    asyncio.run(body())


def test_a_container_cannot_open_the_agent_port(template, run_root):
    async def body():
        vm = await _clone(template, run_root)
        try:
            rootfs = _rootfs(vm, "c1")
            attack = PORT_ATTACK.replace("DIRS", "/tmp /dev /dev/shm /dev/mqueue /data /")
            stdout, stderr, status = await _run(vm, **_process("c1", attack, rootfs))
            got = _fields(stdout)
            assert got["portdev"], f"the probe found no virtio port in sysfs: {stdout} {stderr}"
            assert got["reached"] == "0", stderr
            # Control: from the guest's root, a node in its devtmpfs /dev reaches the port.
            stdout, stderr, _ = await _run(vm, **_process("g1", PORT_ATTACK.replace("DIRS", "/dev"), "",
                                                          guest_root=True))
            assert _fields(stdout)["reached"] == "1", stderr
        finally:
            await vm.stop()
    asyncio.run(body())


def test_user_capabilities_rlimits_hostname_readonly_and_mounts_are_applied(template, run_root):
    async def body():
        vm = await _clone(template, run_root)
        try:
            rootfs = _rootfs(vm, "c1")
            script = r"""
echo id=$(id -u):$(id -g):$(id -G)
echo caps=$(grep -E '^Cap(Eff|Prm|Bnd|Amb)' /proc/self/status | tr -s '\t ' ':' | tr '\n' ' ')
echo nnp=$(grep NoNewPrivs /proc/self/status | tr -d ' \t')
echo nofile=$(ulimit -n):$(ulimit -Hn)
echo hostname=$(hostname)
echo rootro=$(touch /x 2>&1 | grep -c 'Read-only')
echo scratch=$(echo hi > /scratch/f && cat /scratch/f)
echo bind=$(cat /mnt/data/in-data)
echo bindro=$(touch /mnt/data/new 2>&1 | grep -c 'Read-only')
"""
            caps = {name: ["CAP_NET_BIND_SERVICE", "CAP_KILL"] for name in ("bounding", "permitted", "inheritable")}
            caps.update(effective=["CAP_NET_BIND_SERVICE"], ambient=["CAP_NET_BIND_SERVICE"])
            stdout, stderr, status = await _run(vm, **_process(
                "c1", script, rootfs, uid=1000, gid=1001, additional_gids=[2000, 2001], hostname="cbox",
                rootfs_readonly=True, capabilities=caps, rlimits=[("RLIMIT_NOFILE", 64, 128)], no_new_privileges=True,
                mounts=[{"type": "tmpfs", "source": "tmpfs", "destination": "/scratch", "options": ["size=1m"]},
                        {"type": "bind", "source": "/data", "destination": "/mnt/data", "options": ["rbind", "ro"]}]))
            got = _fields(stdout)
            assert status == 0, stderr
            assert got["id"] == "1000:1001:1001 2000 2001"  # busybox id -G lists the gid first
            # A non-root user keeps exactly its ambient set across exec; the bounding set is as asked.
            assert "CapAmb:0000000000000400" in got["caps"] and "CapEff:0000000000000400" in got["caps"]
            assert "CapBnd:0000000000000420" in got["caps"]
            assert got["nnp"] == "NoNewPrivs:1"
            assert got["nofile"] == "64:128"
            assert got["hostname"] == "cbox"
            assert got["rootro"] == "1" and got["scratch"] == "hi"
            assert got["bind"] == "data" and got["bindro"] == "1"
        finally:
            await vm.stop()
    asyncio.run(body())


def test_an_exec_joins_the_container_and_signals_reach_its_process(template, run_root):
    async def body():
        vm = await _clone(template, run_root)
        try:
            rootfs = _rootfs(vm, "c1")
            await vm.agent.create_process(**_process("c1", "echo ready; exec sleep 600", rootfs, hostname="cbox"))
            await vm.agent.start_process("c1")
            first = await asyncio.wait_for(vm.agent.events.get(), 120)
            assert first.process_output.data == b"ready\n"

            stdout, stderr, status = await _run(vm, **_process(
                "e1", "hostname; ps -o comm | grep -c sleep; touch /from-exec; ls /proc/1/root/ | grep -c from-exec",
                rootfs, container_exec_id="c1"))
            assert (stdout.split(), status) == (["cbox", "1", "1"], 0), stderr
            with pytest.raises(AgentError, match="container 'nope' to exec in is not running"):
                await vm.agent.create_process(**_process("e2", "true", rootfs, container_exec_id="nope"))

            # SIGTERM reaches the sleep (PID 2 under the container's init), and the status is exact.
            await vm.agent.signal_process("c1", signal.SIGTERM)
            assert (await _collect(vm, "c1"))[2] == 128 + signal.SIGTERM

            # SIGKILL of the process the agent knows takes the whole container with it.
            # (As another user: the init's drop to the program's ids must keep its parent-death signal.)
            await vm.agent.create_process(**_process("c2", "sleep 600 & exec sleep 601", rootfs, uid=1000, gid=1000))
            await vm.agent.start_process("c2")
            await vm.agent.signal_process("c2", signal.SIGKILL)
            assert (await _collect(vm, "c2"))[2] == 128 + signal.SIGKILL
            stdout, _, _ = await _run(vm, **_process("g1", "ps -o args | grep -c '[s]leep 60'", "", guest_root=True))
            assert stdout.strip() == "0"
        finally:
            await vm.stop()
    asyncio.run(body())


# Runs per kind in the latency report: enough for a median that one slow TCG run does not move.
LATENCY_RUNS = 11
TIMING_LINE = re.compile(r"vmf-contain timing: (.*)")
AGENT_TIMING_LINE = re.compile(r"create_process '(\w+)' timing: (.*)")


def _steps(line: str) -> tuple[float, dict[str, float]]:
    """`first=12.345678 name=+123us ... total=456us` -> (first mark in guest seconds, {name: ms})."""
    fields = [field.partition("=") for field in line.split()]
    steps = {name: float(value.lstrip("+").removesuffix("us")) / 1000 for name, _, value in fields[1:]}
    return float(fields[0][2]), steps


def _median_steps(samples: list[dict[str, float]]) -> str:
    names = list(dict.fromkeys(name for sample in samples for name in sample))
    return " ".join(f"{name} {statistics.median(s.get(name, 0.0) for s in samples):.1f}" for name in names)


def _gaps(agent: dict[str, tuple[float, dict[str, float]]], helper: dict[str, tuple[float, dict[str, float]]]) -> str:
    """What neither side's marks cover: request to the helper's main, its "R" to the agent's read."""
    before, after = [], []
    for exec_id, (received, agent_steps) in agent.items():
        if exec_id in helper:
            started, helper_steps = helper[exec_id]
            before.append((started - received) * 1000)
            after.append((received + agent_steps["total"] / 1000 - started - helper_steps["total"] / 1000) * 1000)
    if not before:
        return "n/a"
    return (f"request to helper main {statistics.median(before):.1f}, helper's R to the agent reading it "
            f"{statistics.median(after):.1f}")


class _Latency:
    """Host-side phases of traced `echo hello` runs, and the guest's breakdown of each CreateProcess."""

    def __init__(self) -> None:
        self.phases: dict[str, list[float]] = {"create": [], "start": [], "first output": [], "exit": []}
        self.helper: dict[str, tuple[float, dict[str, float]]] = {}
        self.agent: dict[str, tuple[float, dict[str, float]]] = {}

    async def run(self, vm: VM, exec_id: str, fields: dict) -> None:
        t0 = time.monotonic()
        await vm.agent.create_process(**{**_process(exec_id, "", ""), **fields, "args": ["echo", "hello"],
                                         "trace_timing": True})
        t1 = time.monotonic()
        await vm.agent.start_process(exec_id)
        t2 = time.monotonic()
        first = None
        while True:
            event = await asyncio.wait_for(vm.agent.events.get(), 120)
            kind = event.WhichOneof("kind")
            if kind == "process_output" and event.process_output.stream == 1 and first is None:
                first = time.monotonic()
            if kind == "process_output" and event.process_output.stream == 2:
                found = TIMING_LINE.search(event.process_output.data.decode())
                if found:
                    self.helper[exec_id] = _steps(found.group(1))
            if kind == "process_exited" and event.process_exited.exec_id == exec_id:
                break
        t3 = time.monotonic()
        for name, value in (("create", t1 - t0), ("start", t2 - t1), ("first output", first - t0),
                            ("exit", t3 - t0)):
            self.phases[name].append(value * 1000)

    def read_agent_log(self, vm: VM, exec_ids: set[str]) -> None:
        log = vm.hypervisor.run.console_log.read_text(errors="replace")
        self.agent.update((found.group(1), _steps(found.group(2))) for found in AGENT_TIMING_LINE.finditer(log)
                          if found.group(1) in exec_ids)

    def report(self, label: str) -> str:
        runs = len(self.phases["create"])
        return (f"\necho hello, {label}, medians of {runs} from CreateProcess (ms): "
                + ", ".join(f"{name} {statistics.median(values):.1f}" for name, values in self.phases.items())
                + f"\n  create runs: {' '.join(f'{v:.0f}' for v in self.phases['create'])}"
                + f"\n  agent (ms): {_median_steps([s for _, s in self.agent.values()])}"
                + f"\n  helper (ms): {_median_steps([s for _, s in self.helper.values()])}"
                + f"\n  between (ms): {_gaps(self.agent, self.helper)}")


def test_process_latency_in_a_clone(template, run_root, capsys):
    """CreateProcess, StartProcess, first output and exit of `echo hello`, contained (as
    kata-runtime asks for a busybox bundle) and in the guest's root, with the guest's own
    breakdown of CreateProcess (reported, not judged). "first in a clone" is what a sandbox
    waits for: one container per fresh clone, its rootfs new to the guest, after the share's
    mount (which a VM cache does before parking a VM: the agent's warm-up container runs then)."""
    async def body():
        first, mounts_ms = _Latency(), []
        for index in range(LATENCY_RUNS):
            vm = await VM.new(template, run_root)
            try:
                await vm.resume()
                started = time.monotonic()
                await vm.agent.mount_shared(SHARED_TAG, GUEST_SHARED)
                mounts_ms.append((time.monotonic() - started) * 1000)
                rootfs = _rootfs(vm, f"f{index}")
                await first.run(vm, f"f{index}", {"rootfs": rootfs, "hostname": "testbox"})
                first.read_agent_log(vm, {f"f{index}"})
            finally:
                await vm.stop()
        reports = [first.report("contained, first in a clone"),
                   f"\n  mount_shared before it (ms): median {statistics.median(mounts_ms):.1f}, runs "
                   f"{' '.join(f'{v:.0f}' for v in mounts_ms)}"]
        vm = await _clone(template, run_root)
        try:
            rootfs = _rootfs(vm, "t")
            for label, fields in (("contained, warm", {"rootfs": rootfs, "hostname": "testbox"}),
                                  ("guest root, warm", {"rootfs": "", "guest_root": True})):
                latency = _Latency()
                exec_ids = {f"{label[0]}{index}" for index in range(LATENCY_RUNS)}
                for exec_id in sorted(exec_ids):
                    await latency.run(vm, exec_id, fields)
                latency.read_agent_log(vm, exec_ids)
                reports.append(latency.report(label))
        finally:
            await vm.stop()
        with capsys.disabled():
            print("".join(reports))
    asyncio.run(body())


def test_a_chroot_escape_from_a_container_lands_back_in_the_container(template, run_root):
    """The container's root is mounted on the initramfs's root: climbing out of it comes back."""
    async def body():
        vm = await _clone(template, run_root)
        try:
            rootfs = _rootfs(vm, "c1")
            host_rootfs = vm.hypervisor.run.shared_dir / "c1" / "rootfs"
            shutil.copy2(ESCAPE_PROGRAM, host_rootfs / "bin" / "chroot_escape")
            stdout, stderr, status = await _run(vm, **_process("c1", "chroot_escape", rootfs))
            assert status == 0, stderr
            found = set(stdout.split()) - {".", "..", "done"}
            assert "container-marker" in found and not found & {"init", "newroot", "usr", "lib", "sbin", "run"}, (
                f"a chroot escape reached a directory outside the container: {sorted(found)}")
        finally:
            await vm.stop()
    asyncio.run(body())


@pytest.mark.parametrize("change,message", [
    ({"mounts": [{"destination": "/dev/kvm", "type": "bind", "source": "/dev/null", "options": ["rbind"]}]},
     "mounts[0] /dev/kvm: bind source /dev/null is a device node"),
    ({"linux": {"sysctl": {"kernel.modprobe": "/x"}}}, "linux.sysctl kernel.modprobe is not in a namespace"),
])
def test_kata_runtime_refuses_unsupported_fields_by_name_before_any_vm(run_root, change, message):
    bundle = make_bundle(os.path.join(run_root, "b"), ["true"], **change)
    config = write_config(run_root, False, 0)
    done = subprocess.run([RUNTIME, "--root", os.path.join(run_root, "state"), "--config", config,
                           "create", "c1", "--bundle", bundle], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr


def test_kata_runtime_run_applies_the_config_json(run_root):
    bundle = os.path.join(run_root, "b")
    script = ("echo id=$(id -u):$(id -G); echo nofile=$(ulimit -n); echo hostname=$(hostname); "
              "echo scratch=$(echo hi > /scratch/f && cat /scratch/f); echo data=$(cat /mnt/data/in-data); "
              "echo nnp=$(grep NoNewPrivs /proc/self/status | tr -d ' \t'); "
              "echo rootro=$(touch /x 2>&1 | grep -c Read-only)")
    make_bundle(bundle, ["sh", "-c", script], hostname="rbox", root={"path": "rootfs", "readonly": True}, process={
        "terminal": False, "user": {"uid": 1000, "gid": 1000, "additionalGids": [3000]}, "args": ["sh", "-c", script],
        "env": ["PATH=/bin"], "cwd": "/", "noNewPrivileges": True,
        "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 77, "hard": 77}],
        "capabilities": {"bounding": ["CAP_KILL"], "effective": [], "permitted": [], "inheritable": [], "ambient": []}},
        mounts=[{"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]},
                {"destination": "/mnt/data", "type": "bind", "source": os.path.join(bundle, "rootfs", "data"),
                 "options": ["rbind", "ro"]},
                {"destination": "/proc", "type": "proc", "source": "proc"}])
    rootfs = os.path.join(bundle, "rootfs")
    for applet in EXTRA_APPLETS:
        os.symlink("/bin/busybox", os.path.join(rootfs, "bin", applet))
    for directory in ("data", "dev", "sys", "scratch", "mnt", "mnt/data"):  # mount points: the rootfs is read-only
        os.mkdir(os.path.join(rootfs, directory))
    with open(os.path.join(rootfs, "data", "in-data"), "w") as f:
        f.write("data\n")
    config = write_config(run_root, False, 0)
    state = os.path.join(run_root, "state")
    try:
        done = subprocess.run([RUNTIME, "--root", state, "--config", config, "run", "c1", "--bundle", bundle],
                              capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run([RUNTIME, "--root", state, "--config", config, "delete", "--force", "c1"], capture_output=True)
    assert done.returncode == 0, done.stderr
    assert _fields(done.stdout) == {"id": "1000:1000 3000", "nofile": "77", "hostname": "rbox", "scratch": "hi",
                                    "data": "data", "nnp": "NoNewPrivs:1", "rootro": "1"}


HOOK = """#!/bin/sh
cat > {out}.json
readlink /proc/self/ns/net > {out}.hookns
pid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' {out}.json)
readlink /proc/$pid/ns/net > {out}.shimns
"""


def test_host_files_and_directories_and_hooks_as_engines_use_them(run_root):
    """Docker/nerdctl/CRI-style config.json: namespaced sysctls applied in the container, a
    resolv.conf-style read-only file (copied), a writable
    file (bound: the container's write reaches it, as with runc), a read-only host directory the
    container can read and not write; a createRuntime hook that sees the shim's own network
    namespace, run from the host's, and a poststop hook."""
    host = os.path.join(run_root, "host")
    os.makedirs(os.path.join(host, "ro"))
    Path(host, "ro", "in-ro").write_text("ro data\n")
    Path(host, "resolv.conf").write_text("nameserver 10.9.8.7\n")
    Path(host, "hosts").write_text("127.0.0.1 localhost\n")
    for name in ("create", "stop"):
        hook = Path(run_root, f"hook-{name}")
        hook.write_text(HOOK.format(out=os.path.join(run_root, name)))
        hook.chmod(0o755)
    script = ("echo resolv=$(cat /etc/resolv.conf); echo ro=$(cat /ro/in-ro); "
              "echo rowrite=$(touch /ro/x 2>&1 | grep -c Read-only); "
              "echo resolvwrite=$(sh -c 'echo x >> /etc/resolv.conf' 2>&1 | grep -c Read-only); "
              "echo '10.1.1.1 added' >> /etc/hosts && echo hostswrite=ok; "
              "echo port=$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start); echo shm=$(cat /proc/sys/kernel/shmmax)")
    bundle = make_bundle(os.path.join(run_root, "b"), ["sh", "-c", script], mounts=[
        {"destination": "/etc/resolv.conf", "type": "bind", "source": os.path.join(host, "resolv.conf"),
         "options": ["rbind", "ro"]},
        {"destination": "/etc/hosts", "type": "bind", "source": os.path.join(host, "hosts"),
         "options": ["rbind", "rprivate"]},
        {"destination": "/ro", "type": "bind", "source": os.path.join(host, "ro"), "options": ["rbind", "ro"]},
        {"destination": "/dev/shm", "type": "bind", "source": host, "options": ["rbind"]}],
        hooks={"createRuntime": [{"path": os.path.join(run_root, "hook-create"), "timeout": 60}],
               "poststop": [{"path": os.path.join(run_root, "hook-stop")}]},
        linux={"resources": {}, "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}],
               "seccomp": {"defaultAction": "SCMP_ACT_ERRNO"},
               "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shmmax": "12345"}})
    config = write_config(run_root, False, 0)
    state = os.path.join(run_root, "state")
    try:
        done = subprocess.run([RUNTIME, "--root", state, "--config", config, "run", "c1", "--bundle", bundle],
                              capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run([RUNTIME, "--root", state, "--config", config, "delete", "--force", "c1"], capture_output=True)
    assert done.returncode == 0, done.stderr
    assert _fields(done.stdout) == {"resolv": "nameserver 10.9.8.7", "ro": "ro data", "rowrite": "1",
                                    "resolvwrite": "1", "hostswrite": "ok", "port": "0", "shm": "12345"}
    assert "linux.seccomp is ignored" in done.stderr and "/dev/shm: the host's shared memory" in done.stderr
    assert Path(host, "hosts").read_text() == "127.0.0.1 localhost\n10.1.1.1 added\n"
    assert sorted(os.listdir(os.path.join(host, "ro"))) == ["in-ro"]
    host_ns = os.readlink("/proc/self/ns/net")
    created = json.loads(Path(run_root, "create.json").read_text())
    assert created["status"] == "creating" and created["id"] == "c1" and created["bundle"] == bundle
    assert Path(run_root, "create.hookns").read_text().strip() == host_ns  # hooks run where runc's run
    assert Path(run_root, "create.shimns").read_text().strip() != host_ns  # the shim has its own
    assert json.loads(Path(run_root, "stop.json").read_text())["status"] == "stopped"


def test_a_failing_create_hook_fails_create_cleans_up_and_runs_poststop(run_root):
    """As runc: a createRuntime hook's failure is create's error (its output named); the container
    is gone and its poststop hooks ran (runc's destroy)."""
    failing = Path(run_root, "hook-fail")
    failing.write_text("#!/bin/sh\necho 'CNI says no' >&2\nexit 7\n")
    failing.chmod(0o755)
    stop = Path(run_root, "hook-stop")
    stop.write_text(f"#!/bin/sh\ncat > {run_root}/stop.json\n")
    stop.chmod(0o755)
    bundle = make_bundle(os.path.join(run_root, "b"), ["true"], hooks={
        "createRuntime": [{"path": str(failing), "args": ["cni-hook", "add"]}], "poststop": [{"path": str(stop)}]})
    config = write_config(run_root, False, 0)
    state = os.path.join(run_root, "state")
    done = subprocess.run([RUNTIME, "--root", state, "--config", config, "create", "c1", "--bundle", bundle],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "createRuntime hook cni-hook add exited with status 7: CNI says no" in done.stderr
    assert json.loads(Path(run_root, "stop.json").read_text())["status"] == "stopped"
    assert not os.path.exists(os.path.join(state, "c1"))
    vm_root = Path(run_root, "vm")
    assert not vm_root.exists() or not any(vm_root.iterdir())  # the hook failed before any VM was taken
