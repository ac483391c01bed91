"""Factory logic with a fake hypervisor: get_vm, the compatibility check, strategies, cache."""
from __future__ import annotations

import asyncio
import os

import pytest

from factory import cache as cache_module
from factory.base import FactoryBase
from factory.cache import CacheFactory
from factory.direct import DirectFactory
from factory.errors import ConfigError, FactoryError, HypervisorError
from factory.factory import Factory, FactoryConfig, Mode, check_vm_config, new_factory
from factory.hypervisor.qemu import QemuState
from factory.ownership import OwnerKind
from factory.vm import VM
from tests.unit import fakes
from tests.unit.fakes import FlakyBase as _FlakyBase
from tests.unit.fakes import config as _config


def test_sizes_and_template_fields_do_not_make_configs_incompatible():
    check_vm_config(_config().valid(), _config(num_vcpus=4, memory_mib=2048, boot_from_template=True,
                                                memory_path="/m", devices_state_path="/s").valid())


def test_an_incompatible_field_is_named():
    with pytest.raises(ConfigError, match="kernel_params: base '', request 'debug'"):
        check_vm_config(_config().valid(), _config(kernel_params="debug").valid())


def test_get_vm_resumes_reseeds_and_sets_the_clock_in_one_handoff(monkeypatch):
    made = fakes.install(monkeypatch)
    sent_before_cont = []
    original_resume = fakes.FakeQemu.resume

    async def resume(self, ctx=None):
        sent_before_cont.append(list(made[-1].agent.calls))
        await original_resume(self, ctx)
    monkeypatch.setattr(fakes.FakeQemu, "resume", resume)

    async def body():
        factory = Factory(DirectFactory(_config().valid()))
        vm = await factory.get_vm(_config())
        assert vm.hypervisor.calls == ["pause", "resume"]
        assert vm.agent.calls == ["handoff"]  # reseed + clock + check: one round trip
        assert sent_before_cont == [["handoff"]]  # on its way before `cont`
        assert len(made) == 1
    asyncio.run(body())


def test_an_agent_from_before_the_handoff_request_is_reseeded_and_clocked_as_before(monkeypatch):
    made = fakes.install(monkeypatch)
    original = fakes.fake_vm

    def old_agent_vm(config):
        vm = original(config)
        vm.agent.predates_handoff = True
        return vm
    monkeypatch.setattr(fakes, "fake_vm", old_agent_vm)

    async def body():
        vm = await Factory(DirectFactory(_config().valid())).get_vm(_config())
        assert vm.agent.calls == ["handoff", "reseed", "set_time"]
        assert not vm.needs_handshake
    asyncio.run(body())
    assert len(made) == 1


def test_a_larger_request_is_hot_plugged_and_recorded():
    async def body():
        factory = Factory(_FlakyBase())  # hands out VMs of the base size, as a template does
        vm = await factory.get_vm(_config(num_vcpus=3, memory_mib=768))
        assert "hotplug_cpus 2" in vm.hypervisor.calls and "hotplug_memory 256" in vm.hypervisor.calls
        assert vm.agent.calls[-1] == "online 3"
        assert (vm.cpu, vm.memory_mib, vm.cpu_delta) == (3, 768, 0)
    asyncio.run(body())


def test_a_direct_vm_is_booted_at_the_requested_size_not_hot_plugged_twice(monkeypatch):
    fakes.install(monkeypatch)

    async def body():
        vm = await Factory(DirectFactory(_config().valid())).get_vm(_config(num_vcpus=3, memory_mib=768))
        assert not [c for c in vm.hypervisor.calls if c.startswith("hotplug")]
        assert (vm.cpu, vm.memory_mib) == (3, 768)
    asyncio.run(body())


def test_a_smaller_request_keeps_the_base_size():
    async def body():
        factory = Factory(_FlakyBase(base_config=_config(num_vcpus=2, memory_mib=1024).valid()))
        vm = await factory.get_vm(_config(num_vcpus=1, memory_mib=512))
        assert not [c for c in vm.hypervisor.calls if c.startswith("hotplug")]
        assert (vm.cpu, vm.memory_mib) == (2, 1024)
    asyncio.run(body())


def test_an_incompatible_request_gets_a_running_direct_vm(monkeypatch):
    made = fakes.install(monkeypatch)

    class Refuses(FactoryBase):
        def config(self):
            return _config().valid()

        async def get_base_vm(self, config, ctx=None):
            raise AssertionError("the base must not be asked for an incompatible VM")

        async def close(self, ctx=None):
            pass

    async def body():
        vm = await Factory(Refuses()).get_vm(_config(kernel_params="other"))
        assert vm.hypervisor.calls == ["pause", "resume"]  # upstream leaves it paused
        assert vm.agent.calls == ["handoff"]
        assert vm.config.hypervisor.kernel_params == "other"
    asyncio.run(body())
    assert len(made) == 1


def test_a_failure_after_the_vm_exists_stops_it(monkeypatch):
    made = fakes.install(monkeypatch)
    original = fakes.fake_vm

    def failing_vm(config):
        vm = original(config)
        vm.agent.fail_on = "handoff"
        return vm
    monkeypatch.setattr(fakes, "fake_vm", failing_vm)

    async def body():
        with pytest.raises(RuntimeError, match="agent handoff failed"):
            await Factory(DirectFactory(_config().valid())).get_vm(_config())
    asyncio.run(body())
    assert made[0].hypervisor.stopped


def test_status_works_for_every_strategy(monkeypatch):
    fakes.install(monkeypatch)
    assert Factory(DirectFactory(_config().valid())).status() == []


def test_fetch_with_a_cache_is_refused():
    with pytest.raises(FactoryError, match="cache factory does not support fetch"):
        asyncio.run(new_factory(FactoryConfig(mode=Mode.CACHE, cache=2, vm_config=_config()), fetch_only=True))


async def _until(predicate, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_cache_keeps_n_ready_and_refills_after_a_hand_out():
    async def body():
        base = _FlakyBase()
        cache = CacheFactory(base, 2)
        await _until(lambda: len(cache.status()) == 2)
        vm = await cache.get_base_vm(base.config())
        assert vm in base.built and not vm.hypervisor.stopped
        await _until(lambda: len(cache.status()) == 2 and len(base.built) == 3)
        other = await cache.get_base_vm(base.config())
        assert other is not vm
        await cache.close()
        assert base.closed
        handed = {vm.id, other.id}
        assert all(v.hypervisor.stopped for v in base.built if v.id not in handed)
        assert not vm.hypervisor.stopped  # a handed-out VM belongs to its taker
        assert [o.kind for o in vm.hypervisor.owners] == [OwnerKind.DIRECT]  # and says so on record
    asyncio.run(body())


def test_get_vm_from_a_cache_refills_only_once_the_vm_is_set_up():
    async def body():
        base = _FlakyBase()
        factory = Factory(CacheFactory(base, 1))
        await _until(lambda: len(factory.status()) == 1)
        pooled = base.built[0]
        built_during_handoff = []
        original = pooled.agent.handoff

        async def handoff(*args, **kwargs):
            built_during_handoff.append(len(base.built))
            await original(*args, **kwargs)
        pooled.agent.handoff = handoff
        vm = await factory.get_vm(_config())
        assert vm is pooled and built_during_handoff == [1]  # no refill competing with the hand-out
        await _until(lambda: len(base.built) == 2)  # then the slot refills
        await factory.close()
    asyncio.run(body())


def test_cache_retries_a_failing_base_and_shows_the_error(monkeypatch):
    monkeypatch.setattr(cache_module, "RETRY_INITIAL_S", 0.01)

    async def body():
        base = _FlakyBase(failures=3)
        cache = CacheFactory(base, 1)
        await _until(lambda: cache.details()["errors"])
        assert "QEMU exploded" in cache.details()["errors"][0]["error"]
        vm = await cache.get_base_vm(base.config())
        assert vm.hypervisor.is_alive()
        await cache.close()
    asyncio.run(body())


def test_cache_never_hands_out_a_dead_vm():
    async def body():
        base = _FlakyBase()
        cache = CacheFactory(base, 1)
        await _until(lambda: len(cache.status()) == 1)
        base.built[0].hypervisor.alive = False  # its QEMU was killed
        vm = await cache.get_base_vm(base.config())
        assert vm is not base.built[0] and vm.hypervisor.is_alive()
        assert base.built[0].hypervisor.stopped
        await cache.close()
    asyncio.run(body())


def test_cache_wait_is_bounded_with_a_clear_error(monkeypatch):
    monkeypatch.setattr(cache_module, "RETRY_INITIAL_S", 0.01)

    async def body():
        cache = CacheFactory(_FlakyBase(failures=10**6), 1, get_timeout_s=0.2)
        with pytest.raises(FactoryError, match="no cached VM became ready within 0 s; failing: slot 0: QEMU exploded"):
            await cache.get_base_vm(_config())
        await cache.close()
    asyncio.run(body())


def test_a_slot_whose_vm_went_to_another_process_refills_at_once_when_a_caller_waits(monkeypatch):
    # Held back "forever": only the waiting caller can start the refill before the bound below.
    monkeypatch.setattr(cache_module, "HANDOUT_REFILL_DELAY_S", 3600.0)

    async def body():
        base = _FlakyBase()
        cache = CacheFactory(base, 1)
        await _until(lambda: len(cache.status()) == 1)
        lease = await cache.lease()
        lease.commit()  # handed over: the refill is held back while nobody waits
        other = await asyncio.wait_for(cache.get_base_vm(base.config()), 30)
        assert other is not lease.vm and other is base.built[1]
        await cache.close()
    asyncio.run(body())


def test_a_pooled_vm_has_its_owner_record_prepared_before_it_is_handed_out():
    async def body():
        base = _FlakyBase()
        cache = CacheFactory(base, 1)
        await _until(lambda: len(cache.status()) == 1)
        assert base.built[0].hypervisor.prepared_owner_records == 1
        await cache.close()
    asyncio.run(body())


class _StoppableVM:
    def __init__(self) -> None:
        self.stopped = 0

    async def stop(self) -> None:
        self.stopped += 1


def test_a_lease_refills_its_slot_once_and_a_given_back_vm_is_stopped():
    from factory.base import Lease
    refills: list[int] = []
    committed = Lease(_StoppableVM(), lambda: refills.append(1))
    committed.commit()
    committed.commit()
    asyncio.run(committed.give_back())  # already ended: the VM was handed over, never stopped here
    assert refills == [1] and committed.vm.stopped == 0
    returned = Lease(_StoppableVM(), lambda: refills.append(2))
    asyncio.run(returned.give_back())
    returned.commit()
    assert refills == [1, 2] and returned.vm.stopped == 1


def test_attaching_a_dead_vm_fails_at_once_instead_of_waiting_for_its_agent(tmp_path):
    # This process with another start time: a pid that was recycled since the VM was recorded.
    state = QemuState(id="gone", run_root=str(tmp_path), pid=os.getpid(), pid_start_time=1, accelerator="tcg",
                      num_vcpus=1, max_vcpus=1, memory_mib=512, max_memory_mib=512, memory_slots=1)
    with pytest.raises(HypervisorError, match=f"QEMU pid {os.getpid()} is not running"):
        asyncio.run(asyncio.wait_for(VM.attach(_config().valid(), state, 1, 512, 0), 5))
