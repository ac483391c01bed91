"""Fault tests: SIGKILL at each stage of the factory's life, then what a user would do next.

Each test kills something for real (the VMCache server, a cached VM's QEMU),
recovers as a user would (start the server again, `factory destroy` with no
server alive) and checks that nothing from before is left: no QEMU, mount,
socket or run directory, and that the next VM starts.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
from pathlib import Path

from configuration import loader
from factory import ownership
from factory.errors import FactoryError
from factory.factory import Factory
from factory.grpccache import GrpcCacheFactory
from factory.ownership import Owner, OwnerKind
from factory.template import TemplateFactory
from factory.vm import VM, stop_recorded
from hostos import process
from tests.integration.vmcache_server import Server
from tests.integration.vmtest import base_config, mounts_under, wait_for, write_config

RUNTIME = "runtime/kata-runtime"
# Bounds on waits for events (a TCG boot on a loaded 2-core host), never expected durations.
BOOT_WAIT_S = 180.0


@dataclasses.dataclass(frozen=True)
class RunningVM:
    vm_id: str
    owner: Owner
    pid: int
    start_time: int

    def is_alive(self) -> bool:
        return process.is_alive(self.pid, self.start_time)


def _vms(run_root: str) -> list[RunningVM]:
    """VMs under the test's VM run root whose QEMU has been recorded."""
    found = []
    for state_file in sorted(Path(run_root, "vm").glob("*/hypervisor.json")):
        owner = ownership.read(state_file.parent)
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue  # removed while listing
        if owner is not None:
            found.append(RunningVM(state_file.parent.name, owner, state["pid"], state["pid_start_time"]))
    return found



def _runtime(config: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RUNTIME, "--config", config, *args], capture_output=True, text=True, timeout=120)


def _kill(server: Server) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()


def _assert_nothing_left(run_root: str) -> None:
    assert process.pids_mentioning(run_root + "/") == [], "processes left"
    assert mounts_under(run_root) == [], "mounts left"
    assert not os.path.exists(os.path.join(run_root, "cache.sock")), "socket left"
    vm_root = Path(run_root, "vm")
    assert not vm_root.exists() or list(vm_root.iterdir()) == [], "run directories left"


def test_server_killed_with_a_full_pool_comes_back_full_and_destroy_needs_no_server(run_root):
    config = write_config(run_root, template=True, cache=2)
    metadata = os.path.join(run_root, "template", "metadata.json")
    first = Server(run_root, config)
    try:
        first.wait_ready(2)
        template_made = os.stat(metadata).st_mtime_ns
        _kill(first)
    finally:
        first.stop()
    orphans = [vm for vm in _vms(run_root) if vm.is_alive()]
    assert len(orphans) == 2 and {vm.owner.kind for vm in orphans} == {OwnerKind.POOL}

    second = Server(run_root, config)  # the README's server command, again
    try:
        second.wait_ready(2)
        assert not any(vm.is_alive() for vm in orphans), second.output()
        assert not {vm.vm_id for vm in orphans} & {vm.vm_id for vm in _vms(run_root)}
        assert os.stat(metadata).st_mtime_ns == template_made, "the matching template was made again"
        _kill(second)
    finally:
        second.stop()

    destroyed = _runtime(config, "factory", "destroy")
    assert destroyed.returncode == 0, destroyed.stderr
    assert destroyed.stdout.splitlines()[-1] == "vm factory destroyed"
    assert "removed the stale VMCache socket" in destroyed.stdout
    _assert_nothing_left(run_root)
    assert not os.path.exists(os.path.join(run_root, "template"))
    assert not os.path.exists(os.path.join(run_root, "template.lock"))

    third = Server(run_root, config)  # and the factory starts from scratch
    try:
        third.wait_ready(2)
    finally:
        third.stop()
    _assert_nothing_left(run_root)


def test_server_killed_while_making_the_template_is_recovered_by_the_next_start(run_root):
    config = write_config(run_root, template=True, cache=1)
    first = Server(run_root, config)
    try:
        booting = wait_for("the template's boot VM",
                           lambda: [vm for vm in _vms(run_root) if vm.owner.kind is OwnerKind.TEMPLATE], BOOT_WAIT_S)
        _kill(first)
    finally:
        first.stop()
    assert booting[0].is_alive()  # orphaned, still writing into the template's memory file

    second = Server(run_root, config)
    try:
        second.wait_ready(1)
        assert not booting[0].is_alive(), second.output()
        assert os.path.exists(os.path.join(run_root, "template", "metadata.json"))
    finally:
        second.stop()
    _assert_nothing_left(run_root)


def test_server_killed_in_the_middle_of_get_base_vm(run_root):
    config = write_config(run_root, template=True, cache=1)
    me = ownership.this_process(OwnerKind.DIRECT)

    async def body(first: Server) -> None:
        await asyncio.to_thread(first.wait_ready, 1)
        client = await GrpcCacheFactory.connect(first.socket, run_root=os.path.join(run_root, "vm"))
        handed = []
        lost: list[RunningVM] = []
        try:
            handed.append(await client.get_base_vm(client.config()))
            # The pool is empty now: this call waits in the server for the refill.
            pending = asyncio.ensure_future(client.get_base_vm(client.config()))
            await asyncio.to_thread(wait_for, "the pool's refill",
                                    lambda: [vm for vm in _vms(run_root) if vm.vm_id != handed[0].id], BOOT_WAIT_S)
            await asyncio.to_thread(_kill, first)
            try:
                handed.append(await pending)  # the reply may have left just before the kill
            except FactoryError:
                pass
            # What was handed over is this process's on record, so the restart's reaping spares it.
            for vm in handed:
                assert ownership.read(vm.hypervisor.run.path) == me

            second = Server(run_root, config)
            try:
                await asyncio.to_thread(second.wait_ready, 1)
                handed_ids = {vm.id for vm in handed}
                others = [vm for vm in _vms(run_root) if vm.vm_id not in handed_ids]
                # A reply lost to the kill: the server records the client as the owner before it
                # replies (so a crash never reaps a VM a client holds), and the reply never came.
                # That VM is this process's on record, spared by the restart, and ours to stop.
                lost.extend(vm for vm in others if vm.owner == me)
                assert len(lost) <= 1, lost
                assert all(vm.owner.pid == second.proc.pid for vm in others if vm not in lost), second.output()
                for vm in handed:  # and they still work
                    await vm.resume()
                    await vm.agent.check()
            finally:
                await asyncio.to_thread(second.stop)
        finally:
            await client.close()
            for vm in handed:
                await vm.stop()
            handed_ids = {vm.id for vm in handed}
            for vm in _vms(run_root):  # a lost reply's VM (above), even when the test failed first
                if vm.owner == me and vm.vm_id not in handed_ids:
                    await stop_recorded(json.loads(Path(run_root, "vm", vm.vm_id, "hypervisor.json").read_text()))

    first = Server(run_root, config)
    try:
        asyncio.run(body(first))
    finally:
        first.stop()
    _assert_nothing_left(run_root)


def _pool_without(server: Server, pid: int):
    """The server's status once its two ready VMs are live and `pid` is not one of them."""
    status = server.wait_ready(2)
    pids = {vm.pid for vm in status.vmstatus}  # a dead VM not yet noticed shows pid 0
    return status if pid not in pids and 0 not in pids else None


def test_a_cached_vms_qemu_killed_is_replaced(run_root):
    config = write_config(run_root, template=True, cache=2)
    server = Server(run_root, config)
    try:
        pool = server.wait_ready(2)
        victim = [vm for vm in _vms(run_root) if vm.pid == pool.vmstatus[0].pid][0]
        os.kill(victim.pid, signal.SIGKILL)
        refilled = wait_for("a replacement VM", lambda: _pool_without(server, victim.pid), BOOT_WAIT_S)
        assert len(refilled.vmstatus) == 2
        assert not Path(run_root, "vm", victim.vm_id).exists()
    finally:
        server.stop()
    _assert_nothing_left(run_root)


def test_two_template_creators_make_one_template_and_both_get_vms(run_root):
    template_path = os.path.join(run_root, "template")
    vm_root = os.path.join(run_root, "vm")
    config = base_config()

    async def body() -> None:
        both = await asyncio.gather(*(TemplateFactory.open_or_create(config, template_path, vm_root)
                                      for _ in range(2)))
        try:
            assert sorted(t.created for t in both) == [False, True]  # one made it, one waited and reused it
            vms = []
            try:
                for template in both:
                    vms.append(await Factory(template, vm_root).get_vm(config))
                for vm in vms:
                    await vm.agent.check()
            finally:
                for vm in vms:
                    await vm.stop()
        finally:
            await both[0].close()

    asyncio.run(body())
    assert not os.path.exists(template_path)
    _assert_nothing_left(run_root)


def test_gc_reaps_a_dead_owners_vm_and_keeps_a_live_ones(run_root):
    vm_root = os.path.join(run_root, "vm")
    config = write_config(run_root, template=False, cache=0)

    async def body() -> None:
        orphan = await VM.new(base_config(), vm_root)
        try:
            kept = await VM.new(base_config(), vm_root)
            try:
                await orphan.disconnect()
                # As if its shim had died: the owner on record is a pid that no longer runs.
                child = subprocess.Popen(["true"])
                child.wait()
                ownership.write(orphan.hypervisor.run.path, Owner(OwnerKind.CONTAINER, child.pid, 1, "gone"))
                out = await asyncio.to_thread(_runtime, config, "factory", "gc")
                assert out.returncode == 0, out.stderr
                assert f"VM {orphan.id}: container owner pid {child.pid} (container gone) is gone" in out.stdout
                assert out.stdout.splitlines()[-1] == f"1 orphaned VM(s) reaped in {vm_root}"
                assert not orphan.hypervisor.is_alive() and not orphan.hypervisor.run.exists()
                await kept.agent.check()
            finally:
                await kept.stop()
        finally:
            await orphan.stop()

    asyncio.run(body())
    _assert_nothing_left(run_root)


def test_server_shares_a_matching_template_and_replaces_a_stale_one(run_root):
    """A sandbox made the template while the server was down (the runtime's fallback): the server uses it."""
    config = write_config(run_root, template=True, cache=1)
    template_path = os.path.join(run_root, "template")
    metadata = Path(template_path, "metadata.json")
    vm_root = os.path.join(run_root, "vm")

    vm_config = loader.load(config).vm_config.valid()  # as the runtime reads it

    def make_template() -> None:
        asyncio.run(TemplateFactory.open_or_create(vm_config, template_path, vm_root))

    make_template()
    made = metadata.stat().st_mtime_ns
    server = Server(run_root, config)
    try:
        server.wait_ready(1)
        assert metadata.stat().st_mtime_ns == made, server.output()
    finally:
        server.stop()

    make_template()
    stale = json.loads(metadata.read_text()) | {"kernel_params": "made for another configuration"}
    metadata.write_text(json.dumps(stale))
    server = Server(run_root, config)
    try:
        server.wait_ready(1)
        assert json.loads(metadata.read_text())["kernel_params"] != stale["kernel_params"], server.output()
    finally:
        server.stop()
    _assert_nothing_left(run_root)
