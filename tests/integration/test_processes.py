"""Container processes in real VMs: the 9p share, a busybox rootfs, output, exit codes, signals."""
from __future__ import annotations

import asyncio
import signal
import statistics
import time

import pytest

from factory.errors import AgentError
from factory.vm import VM
from tests.integration.vmtest import GUEST_SHARED, SHARED_TAG, base_config, share_rootfs


def _rootfs(vm: VM, container_id: str) -> str:
    return share_rootfs(vm, container_id)[1]


def _process(exec_id: str, args: list[str], rootfs: str, **overrides) -> dict:
    fields = dict(exec_id=exec_id, args=args, env=["PATH=/bin", "HOME=/"], cwd="/", uid=0, gid=0,
                  additional_gids=[], rootfs=rootfs, rootfs_readonly=False, hostname="")
    fields.update(overrides)
    return fields


async def _collect(vm: VM, exec_id: str, started: float | None = None) -> tuple[bytes, bytes, int, float, float]:
    """stdout, stderr, exit status, and seconds from `started` to the first output and to the exit."""
    out = {1: b"", 2: b""}
    first = None
    while True:
        event = await asyncio.wait_for(vm.agent.events.get(), 60)
        kind = event.WhichOneof("kind")
        if kind == "process_output" and event.process_output.exec_id == exec_id:
            if first is None:
                first = time.monotonic()
            out[event.process_output.stream] += event.process_output.data
        elif kind == "process_exited" and event.process_exited.exec_id == exec_id:
            now = time.monotonic()
            base = started or now
            return out[1], out[2], event.process_exited.exit_status, (first or now) - base, now - base


def test_a_process_runs_in_a_busybox_rootfs_over_9p(run_root):
    async def body():
        vm = await VM.new(base_config(), run_root)
        try:
            await vm.agent.mount_shared(SHARED_TAG, GUEST_SHARED)
            await vm.agent.mount_shared(SHARED_TAG, GUEST_SHARED)  # idempotent
            rootfs = _rootfs(vm, "c1")
            details = await vm.agent.get_guest_details()

            pid = await vm.agent.create_process(**_process("c1", ["sh", "-c", "echo hello; uname -r; exit 7"], rootfs,
                                                           hostname="testbox"))
            assert pid > 1
            waiting = asyncio.ensure_future(vm.agent.wait_process("c1"))
            await vm.agent.start_process("c1")
            stdout, stderr, status, _, _ = await _collect(vm, "c1")
            assert (stdout, stderr, status) == (f"hello\n{details.kernel_release}\n".encode(), b"", 7)
            assert await asyncio.wait_for(waiting, 10) == 7

            with pytest.raises(AgentError, match="executable 'nonexistent' not found in rootfs"):
                await vm.agent.create_process(**_process("bad", ["nonexistent"], rootfs))

            # / is the rootfs (with the guest's /dev and /sys mounted in it); the hostname is the container's.
            await vm.agent.create_process(**_process("e1", ["sh", "-c", "ls /; hostname; echo err >&2"], rootfs,
                                                     hostname="testbox"))
            await vm.agent.start_process("e1")
            stdout, stderr, status, _, _ = await _collect(vm, "e1")
            assert status == 0 and stderr == b"err\n"
            assert stdout.split() == [b"bin", b"dev", b"etc", b"proc", b"sys", b"tmp", b"testbox"]

            # Signals, and stdin.
            await vm.agent.create_process(**_process("s1", ["sleep", "600"], rootfs))
            await vm.agent.start_process("s1")
            await vm.agent.signal_process("s1", signal.SIGTERM)
            assert (await _collect(vm, "s1"))[2] == 128 + signal.SIGTERM
            with pytest.raises(AgentError, match="not running"):
                await vm.agent.signal_process("s1", signal.SIGKILL)
            await vm.agent.create_process(**_process("cat", ["cat"], rootfs), open_stdin=True)
            await vm.agent.start_process("cat")
            await vm.agent.write_stdin("cat", b"through stdin\n")
            await vm.agent.close_stdin("cat")
            assert (await _collect(vm, "cat"))[:3] == (b"through stdin\n", b"", 0)
        finally:
            await vm.stop()
    asyncio.run(body())


def test_read_only_rootfs_refuses_writes(run_root):
    async def body():
        vm = await VM.new(base_config(), run_root)
        try:
            await vm.agent.mount_shared(SHARED_TAG, GUEST_SHARED)
            rootfs = _rootfs(vm, "ro")
            await vm.agent.create_process(**_process("ro", ["sh", "-c", "touch /tmp/x"], rootfs, rootfs_readonly=True))
            await vm.agent.start_process("ro")
            _, stderr, status, _, _ = await _collect(vm, "ro")
            assert status != 0 and b"Read-only file system" in stderr
        finally:
            await vm.stop()
    asyncio.run(body())


def test_output_survives_the_host_disconnecting(template, run_root):
    async def body():
        vm = await VM.new(template, run_root)
        await vm.resume()
        try:
            await vm.agent.mount_shared(SHARED_TAG, GUEST_SHARED)
            rootfs = _rootfs(vm, "d1")
            await vm.agent.create_process(**_process("d1", ["sh", "-c", "sleep 1; echo after; exit 4"], rootfs))
            await vm.agent.start_process("d1")
            await vm.agent.close()  # the host goes away while the process runs
            await asyncio.sleep(2)
            await vm.agent.connect(10)
            stdout, _, status, _, _ = await _collect(vm, "d1")
            assert (stdout, status) == (b"after\n", 4)
        finally:
            await vm.stop()
    asyncio.run(body())


def test_echo_latency_in_a_clone(template, run_root, capsys):
    """Measures CreateProcess to first output and to exit for `echo hello` (reported, not judged)."""
    async def body():
        vm = await VM.new(template, run_root)
        await vm.resume()
        try:
            await vm.agent.mount_shared(SHARED_TAG, GUEST_SHARED)
            rootfs = _rootfs(vm, "t")
            firsts, exits = [], []
            for index in range(5):
                started = time.monotonic()
                await vm.agent.create_process(**_process(f"t{index}", ["echo", "hello"], rootfs))
                await vm.agent.start_process(f"t{index}")
                stdout, _, status, first, done = await _collect(vm, f"t{index}", started)
                assert (stdout, status) == (b"hello\n", 0)
                firsts.append(first * 1000)
                exits.append(done * 1000)
            with capsys.disabled():
                print(f"\necho hello in a clone: CreateProcess to first output {statistics.median(firsts):.1f} ms, "
                      f"to exit {statistics.median(exits):.1f} ms (medians of 5; first output "
                      f"{', '.join(f'{v:.0f}' for v in firsts)} ms; exit {', '.join(f'{v:.0f}' for v in exits)} ms)")
        finally:
            await vm.stop()
    asyncio.run(body())
