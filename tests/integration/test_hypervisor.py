"""The QEMU driver and the guest agent on real VMs (TCG here, KVM where usable)."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import time

import pytest

from factory.errors import AgentTimeoutError, BootError, ConfigError
from factory.hypervisor.qemu import Qemu
from factory.vm import VM
from tests.integration.vmtest import base_config


async def _clone(template_cfg, run_root) -> VM:
    vm = await VM.new(template_cfg, run_root)
    assert await vm.hypervisor.run_status() == "paused"
    await vm.resume()
    return vm


def test_direct_boot_answers_and_runs_a_guest_kernel(run_root):
    async def body():
        vm = await VM.new(base_config(), run_root)
        try:
            check = await vm.agent.check()
            assert check.protocol_version >= 1
            details = await vm.agent.get_guest_details()
            assert details.kernel_release and details.kernel_release != os.uname().release
            assert details.online_cpus == 1
            assert vm.hypervisor.is_alive()
        finally:
            await vm.stop()
        assert not vm.hypervisor.is_alive()
        assert not vm.hypervisor.run.exists()
    asyncio.run(body())


def test_clones_differ_after_reseed_and_keep_host_time(template, run_root):
    async def body():
        clones = [await _clone(template, run_root) for _ in range(3)]
        try:
            for vm in clones:
                await vm.reseed_rng()
                await vm.sync_time()
            randoms = [await vm.agent.read_random(32) for vm in clones]
            assert len(set(randoms)) == 3, "clones share their RNG state after reseeding"
            for vm in clones:
                details = await vm.agent.get_guest_details()
                guest = details.wall_clock_sec + details.wall_clock_nsec / 1e9
                assert abs(guest - time.time()) < 1.0
        finally:
            for vm in clones:
                await vm.stop()
    asyncio.run(body())


def test_hotplugged_cpu_and_memory_come_online(template, run_root):
    # Two rounds: the second hot-add lands on a guest that already onlined one (the "later
    # hot-adds" case). online_cpu_memory must return only once all of it is online: the details
    # are read right after, with no retry.
    async def body():
        vm = await _clone(template, run_root)
        try:
            before = await vm.agent.get_guest_details()
            for round_ in (1, 2):
                assert await vm.add_cpus(1) == 1
                await vm.add_memory(256)
                await vm.online_cpu_memory()
                after = await vm.agent.get_guest_details()
                assert after.online_cpus == before.online_cpus + round_
                assert after.mem_total_kib >= before.mem_total_kib + round_ * 250 * 1024
            assert vm.cpu == 3 and vm.memory_mib == before_mib + 512
        finally:
            await vm.stop()
    before_mib = template.hypervisor.memory_mib
    asyncio.run(body())


def test_a_second_process_can_reattach_a_vm(template, run_root):
    async def body():
        vm = await _clone(template, run_root)
        try:
            await vm.disconnect()
            again = await Qemu.attach(vm.id, run_root)
            assert await again.run_status() == "running"
            vm.hypervisor = again
        finally:
            await vm.stop()
    asyncio.run(body())


def test_missing_kernel_is_named_and_nothing_starts(run_root):
    cfg = base_config(kernel_path="/nonexistent/vmlinux")
    with pytest.raises(ConfigError, match="/nonexistent/vmlinux"):
        asyncio.run(VM.new(cfg, run_root))


def test_qemu_failing_at_start_reports_its_stderr(run_root, tmp_path):
    not_a_kernel = tmp_path / "vmlinux"
    not_a_kernel.write_bytes(b"this is not a kernel")
    with pytest.raises(BootError, match="QEMU said"):
        asyncio.run(VM.new(base_config(kernel_path=str(not_a_kernel)), run_root))


def test_guest_panic_during_boot_reports_the_console(run_root):
    cfg = base_config(kernel_params="rdinit=/nonexistent")
    with pytest.raises(BootError, match="guest console"):
        asyncio.run(VM.new(cfg, run_root))


def test_agent_that_never_answers_times_out(run_root):
    cfg = base_config(kernel_params="rdinit=/bin/sh")
    cfg = dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent, dial_timeout_s=8.0))
    with pytest.raises(AgentTimeoutError):
        asyncio.run(VM.new(cfg, run_root))

