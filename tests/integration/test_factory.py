"""Every factory strategy on real VMs: direct, template, cache over each."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from factory.errors import TemplateError
from factory.factory import FactoryConfig, Mode, new_factory
from factory.template import TemplateFactory
from tests.integration.vmtest import base_config


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


async def _assert_running(vm) -> None:
    assert await vm.hypervisor.run_status() == "running"
    await vm.agent.check()


def test_direct_factory_gives_a_running_vm(run_root):
    async def body():
        factory = await new_factory(FactoryConfig(vm_config=base_config(), run_root=run_root))
        vm = await factory.get_vm(base_config())
        try:
            await _assert_running(vm)
            assert factory.status() == []
        finally:
            await vm.stop()
            await factory.close()
    asyncio.run(body())


def test_template_factory_clones_fit_the_request_and_refuse_a_stale_template(run_root):
    template_path = os.path.join(run_root, "template")

    async def body():
        factory = await new_factory(FactoryConfig(mode=Mode.TEMPLATE, template_path=template_path,
                                                  vm_config=base_config(), run_root=run_root))
        try:
            assert os.path.ismount(template_path)
            assert set(os.listdir(template_path)) == {"memory", "state", "metadata.json"}
            with pytest.raises(TemplateError, match="There is already a VM template"):
                await TemplateFactory.create(base_config(), template_path, run_root)

            # Two clones: different RNG output, clocks within a second of the host.
            a, b = [await factory.get_vm(base_config()) for _ in range(2)]
            try:
                assert await a.agent.read_random(32) != await b.agent.read_random(32)
                for vm in (a, b):
                    details = await vm.agent.get_guest_details()
                    assert abs(details.wall_clock_sec + details.wall_clock_nsec / 1e9 - time.time()) < 1.0
            finally:
                await a.stop()
                await b.stop()

            # A bigger request is hot-plugged and the guest onlines it.
            bigger = base_config(num_vcpus=2, memory_mib=base_config().hypervisor.memory_mib + 256)
            vm = await factory.get_vm(bigger)
            try:
                details = await vm.agent.get_guest_details()
                assert details.online_cpus == 2
                assert vm.cpu == 2 and vm.memory_mib == bigger.hypervisor.memory_mib
            finally:
                await vm.stop()

            # Fetch checks the metadata: a template made for another size is refused.
            assert TemplateFactory.fetch(base_config(), template_path, run_root)
            with pytest.raises(TemplateError, match="memory_mib: template has 512, config needs 1024"):
                TemplateFactory.fetch(base_config(memory_mib=1024), template_path, run_root)
        finally:
            await factory.close()
        assert not os.path.exists(template_path)
    asyncio.run(body())


def test_cache_over_direct_and_a_killed_cached_vm_is_replaced(run_root):
    async def body():
        factory = await new_factory(FactoryConfig(mode=Mode.CACHE, cache=1, vm_config=base_config(), run_root=run_root))
        try:
            deadline = time.monotonic() + 120
            while not factory.status():
                assert time.monotonic() < deadline, "the cache never filled"
                await asyncio.sleep(0.1)
            victim = factory.status()[0].pid
            os.kill(victim, signal.SIGKILL)
            while process_alive(victim):
                await asyncio.sleep(0.01)
            vm = await factory.get_vm(base_config())
            try:
                assert vm.hypervisor.state.pid != victim
                await _assert_running(vm)
            finally:
                await vm.stop()
        finally:
            await factory.close()
    asyncio.run(body())


def test_cache_over_template_hands_out_clones_and_refills(run_root):
    template_path = os.path.join(run_root, "template")

    async def body():
        factory = await new_factory(FactoryConfig(mode=Mode.CACHE, template=True, template_path=template_path, cache=2,
                                                  vm_config=base_config(), run_root=run_root))
        try:
            vm = await factory.get_vm(base_config())
            try:
                await _assert_running(vm)
                deadline = time.monotonic() + 60
                while len(factory.status()) < 2:
                    assert time.monotonic() < deadline, "the cache did not refill"
                    await asyncio.sleep(0.05)
                assert vm.hypervisor.state.pid not in {s.pid for s in factory.status()}
            finally:
                await vm.stop()
        finally:
            await factory.close()
        assert not os.path.exists(template_path)
    asyncio.run(body())
