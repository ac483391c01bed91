"""GetBaseVM's server side: whom it records as the VM's owner, and the reply it sends."""
import asyncio
import json
import os

from factory import ownership
from factory.factory import Factory
from factory.grpccache import OWNER_KIND_KEY, OWNER_PID_KEY, OWNER_START_TIME_KEY, _claim_metadata
from factory.ownership import Owner, OwnerKind
from native import vmstate
from tests.unit import cache_server, fakes
from vmcache.service import CacheService, PreparedReplies, grpc_vm_bytes


def _get_base_vm(base: fakes.FlakyBase, metadata, replies: PreparedReplies | None = None) -> vmstate.GrpcVMFields:
    async def body():
        async with cache_server.serving(CacheService(Factory(base), lambda: None, replies=replies)) as get_base_vm:
            return await get_base_vm(metadata=metadata, timeout=10)

    return asyncio.run(body())


def test_the_caller_is_recorded_as_owner_with_the_kind_and_container_it_acts_as():
    base = fakes.StatefulBase()
    with ownership.acting_as(OwnerKind.CONTAINER, "c1"):
        metadata = _claim_metadata()
    _get_base_vm(base, metadata)
    me = ownership.this_process(OwnerKind.CONTAINER, "c1")
    assert base.built[0].hypervisor.owners == [me]


def test_a_claim_to_a_kind_only_the_server_has_records_nobody():
    base = fakes.StatefulBase()
    me = ownership.this_process(OwnerKind.POOL)
    _get_base_vm(base, ((OWNER_PID_KEY, str(me.pid)), (OWNER_START_TIME_KEY, str(me.start_time)),
                        (OWNER_KIND_KEY, OwnerKind.POOL.value)))
    assert base.built[0].hypervisor.owners == []


def test_a_claim_for_a_dead_process_records_nobody():
    base = fakes.StatefulBase()
    dead = Owner(OwnerKind.DIRECT, os.getpid(), ownership.this_process(OwnerKind.DIRECT).start_time + 1)
    _get_base_vm(base, ((OWNER_PID_KEY, str(dead.pid)), (OWNER_START_TIME_KEY, str(dead.start_time))))
    assert base.built[0].hypervisor.owners == []


def test_the_reply_is_the_one_prepared_when_the_vm_was_parked():
    replies = PreparedReplies()

    class _PreparingBase(fakes.StatefulBase):
        async def get_base_vm(self, config, ctx=None):
            vm = await super().get_base_vm(config, ctx)
            replies.prepare(vm)  # as the server's on_ready does
            vm.hypervisor.state.to_dict = lambda: {"id": "not encoded again at hand-out"}
            return vm

    base = _PreparingBase()
    fields = _get_base_vm(base, (), replies)
    vm = base.built[0]
    assert json.loads(fields.hypervisor) == {"id": vm.id, "pid": vm.hypervisor.state.pid}


def test_a_vm_nobody_prepared_is_encoded_at_hand_out():
    base = fakes.StatefulBase()
    fields = _get_base_vm(base, ())
    assert fields.hypervisor == vmstate.decode_grpc_vm(grpc_vm_bytes(base.built[0])).hypervisor
