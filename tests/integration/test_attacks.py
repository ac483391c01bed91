"""Attacks on the host from inside a sandbox, written as tests.

Each plays an attacker, either a container process (through kata-runtime) or a guest that has
escaped to guest root (a process the agent runs uncontained, rootfs "/"), then tears the sandbox
down as the host would. Every test asserts that a host canary (a tmpfs mounted outside the bundle,
and files outside the bundle) is untouched, that the bundle's rootfs is intact, and (through the
run_root fixture) that nothing is left: no QEMU, no mount, no run directory.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from factory import sharedfs
from factory.hypervisor.rundir import LOGS_MIB
from factory.vm import VM
from hostos import mountinfo, mounts
from runtime.sandbox import commands
from runtime.sandbox.state import ContainerState, StateStore, Status
from tests.integration.bundles import make_bundle
from tests.integration.vmtest import base_config, mounts_under, short_tempdir, write_config

GUEST_SHARED = sharedfs.GUEST_SHARED_DIR
RUNTIME = "runtime/kata-runtime"
CANARY_FILES = {"secret": b"host data\n", "keep/me": b"still here\n"}
# Enough to show a write that should be refused was refused, small enough for a test's tmpfs.
FLOOD_MIB = 8
# A TCG guest runs the container's attack script in seconds; a loaded CI machine takes longer.
ATTACK_TIMEOUT_S = 120.0
# Twice the console's cap (RunDir LOGS_MIB): shows the cap holds without minutes of TCG serial output.
CONSOLE_FLOOD_BYTES = 2 * LOGS_MIB * 1024 * 1024


class Canary:
    """A host tmpfs with files, plus a plain file, both outside the bundle and the run root."""

    def __init__(self) -> None:
        self.dir = short_tempdir("kvf-canary-")
        self.mount = os.path.join(self.dir, "mnt")
        os.mkdir(self.mount)
        mounts.mount_tmpfs(self.mount, 1)
        self.mount_id = mountinfo.top_mount_at(self.mount).mount_id
        for name, data in CANARY_FILES.items():
            Path(self.mount, name).parent.mkdir(exist_ok=True)
            Path(self.mount, name).write_bytes(data)
        self.file = os.path.join(self.dir, "plain")
        Path(self.file).write_bytes(b"plain host file\n")

    def assert_intact(self) -> None:
        top = mountinfo.top_mount_at(self.mount)
        assert top is not None and top.mount_id == self.mount_id, "the host canary tmpfs was unmounted"
        for name, data in CANARY_FILES.items():
            assert Path(self.mount, name).read_bytes() == data
        assert sorted(os.listdir(self.mount)) == ["keep", "secret"]
        assert Path(self.file).read_bytes() == b"plain host file\n"

    def remove(self) -> None:
        if mountinfo.top_mount_at(self.mount) is not None:
            mounts.unmount_lazy(self.mount)
        subprocess.run(["rm", "-rf", "--one-file-system", self.dir], check=False)


@pytest.fixture
def canary():
    c = Canary()
    yield c
    c.remove()


def _rootfs_listing(rootfs: str) -> dict[str, str]:
    """What the bundle's rootfs holds that the attacks must not destroy: the files make_bundle made."""
    listing = {}
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            listing[os.path.relpath(path, rootfs)] = os.readlink(path) if os.path.islink(path) else ""
    return listing


def _assert_rootfs_intact(rootfs: str, before: dict[str, str]) -> None:
    after = _rootfs_listing(rootfs)
    missing = {k: v for k, v in before.items() if after.get(k) != v}
    assert not missing, f"the bundle rootfs lost {sorted(missing)[:10]}"
    assert os.path.getsize(os.path.join(rootfs, "bin", "busybox")) > 0


async def _guest_root_sh(vm: VM, exec_id: str, script: str) -> tuple[bytes, int]:
    """Runs `script` as guest root outside any container: the guest escaped."""
    await vm.agent.create_process(exec_id=exec_id, args=["/bin/sh", "-c", script], env=["PATH=/bin"], cwd="/",
                                  uid=0, gid=0, additional_gids=[], rootfs="",
                                  guest_root=True)
    await vm.agent.start_process(exec_id)
    output = b""
    while True:
        event = await asyncio.wait_for(vm.agent.events.get(), 120)
        kind = event.WhichOneof("kind")
        if kind == "process_output" and event.process_output.exec_id == exec_id:
            output += event.process_output.data
        elif kind == "process_exited" and event.process_exited.exec_id == exec_id:
            return output, event.process_exited.exit_status


def test_guest_root_cannot_steer_host_teardown_through_the_share(run_root, canary):
    """The issue's attack from guest root: rename the container's share directory, plant its rootfs
    as a symlink to a host tmpfs, plant setuid files and device nodes, fill the share, write to the
    agent's port; then `delete --force` with the shim gone (the cleanup that trusts only saved state)."""
    bundle = make_bundle(os.path.join(run_root, "b"), ["true"])
    rootfs = os.path.join(bundle, "rootfs")
    before = _rootfs_listing(rootfs)
    attack = f"""
        cd {GUEST_SHARED} || exit 90
        bb=/bin/busybox
        $bb mv c1 c1.moved && echo RENAMED
        $bb mkdir c2 && echo MKDIR
        $bb ln -s {canary.mount} c2/rootfs && echo SYMLINK
        $bb ln -s {canary.mount} planted && echo PLANTED
        $bb dd if=/dev/zero of=flood bs=1M count={FLOOD_MIB} 2>/dev/null && echo FLOODED
        $bb cp /bin/busybox c1/rootfs/suid && $bb chmod 4755 c1/rootfs/suid && echo SUID
        $bb mknod c1/rootfs/mem c 1 1 && echo MKNOD
        $bb mv c1/rootfs c1/gone && echo MOVED_ROOTFS
        for port in /dev/vport*; do echo garbage > $port 2>/dev/null && echo WROTE_AGENT_PORT; done
        exit 0
    """

    store = StateStore(os.path.join(run_root, "state"))

    async def body() -> None:
        vm = await VM.new(base_config(), run_root)
        handed_over = False
        try:
            store.reserve("c1")
            rootfs_share = await vm.share_rootfs("c1", rootfs, readonly=False)
            store.save(ContainerState(id="c1", bundle=bundle, status=Status.RUNNING, vm=vm.record(),
                                      share_mount=rootfs_share.mount_point, share_mount_id=rootfs_share.mount_id))
            output, status = await _guest_root_sh(vm, "attack", attack)
            assert status == 0, output
            said = output.decode().split()
            # The export is read-only to the guest: no rename, no new names, no flood outside rootfs.
            for refused in ("RENAMED", "MKDIR", "SYMLINK", "PLANTED", "FLOODED", "MOVED_ROOTFS"):
                assert refused not in said, output
            # Whatever reached the agent's port, the agent still serves the host.
            assert await _guest_root_sh(vm, "after", "echo alive") == (b"alive\n", 0)
            # Inside its own rootfs the guest may write, but on the host what it plants is inert.
            options = mountinfo.by_id(rootfs_share.mount_id).options.split(",")
            assert "nosuid" in options and "nodev" in options
            if "MKNOD" in said:
                with pytest.raises(PermissionError):
                    open(os.path.join(rootfs_share.mount_point, "mem"), "rb")
            # As if the shim had died: `delete --force` cleans up from the saved state alone.
            await vm.agent.close()
            await vm.hypervisor.disconnect()
            handed_over = True
        finally:
            if not handed_over:
                await vm.stop()

    asyncio.run(body())
    assert commands.delete(store, "c1", force=True) == 0
    canary.assert_intact()
    _assert_rootfs_intact(rootfs, before)
    assert not mounts_under(run_root)


def test_a_guest_flooding_its_console_is_capped(run_root):
    async def body() -> None:
        vm = await VM.new(base_config(), run_root)
        try:
            output, status = await _guest_root_sh(
                vm, "flood", f"/bin/busybox head -c {CONSOLE_FLOOD_BYTES} /dev/zero | /bin/busybox tr '\\0' x "
                             "> /dev/ttyS0; echo DONE")
            assert b"DONE" in output, output
            assert os.path.getsize(vm.hypervisor.run.console_log) <= LOGS_MIB * 1024 * 1024
            assert vm.hypervisor.is_alive()
        finally:
            await vm.stop()

    asyncio.run(body())


class Runtime:
    def __init__(self, root: str) -> None:
        config = write_config(root, template=False, cache=0)
        self.base = [RUNTIME, "--root", os.path.join(root, "state"), "--config", config]

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        # Files, not pipes: create hands its stdout/stderr to the shim, which outlives it.
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            code = subprocess.run(self.base + list(args), stdout=out, stderr=err, text=True, timeout=300).returncode
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(args, code, out.read(), err.read())


def test_a_container_playing_the_issues_attack_cannot_touch_the_host(run_root, canary):
    """From inside the container: reach the share through /proc/1/root if it can, rename, plant
    symlinks to the host canary, plant setuid files and device nodes in its rootfs; then
    `kata-runtime delete --force`, as in the issue."""
    shared = f"/proc/1/root{GUEST_SHARED}"
    script = f"""
        bb=/bin/busybox
        $bb ls {shared} >/dev/null 2>&1 && echo REACHED_SHARE
        $bb mv {shared}/c1 {shared}/c1.moved 2>/dev/null && echo RENAMED
        $bb mkdir -p {shared}/c1 2>/dev/null; $bb ln -s {canary.mount} {shared}/c1/rootfs 2>/dev/null && echo SYMLINK
        $bb cp /bin/busybox /suid && $bb chmod 4755 /suid && echo SUID
        $bb mknod /mem c 1 1 2>/dev/null && echo MKNOD
        $bb ln -s {canary.mount} /canary-link
        echo done > /attack-done
        exec $bb sleep 600
    """
    bundle = make_bundle(os.path.join(run_root, "b"), ["sh", "-c", script])
    rootfs = os.path.join(bundle, "rootfs")
    before = _rootfs_listing(rootfs)
    runtime = Runtime(run_root)
    created = runtime("create", "c1", "--bundle", bundle)
    assert created.returncode == 0, created.stderr
    try:
        assert runtime("start", "c1").returncode == 0
        # The script's last word before sleeping, seen through the bundle: its attacks are done.
        done_file = os.path.join(rootfs, "attack-done")
        deadline = time.monotonic() + ATTACK_TIMEOUT_S
        while not os.path.exists(done_file):
            assert time.monotonic() < deadline, "the container's attack script never finished"
            time.sleep(0.1)
    finally:
        deleted = runtime("delete", "--force", "c1")
    assert deleted.returncode == 0, deleted.stderr
    canary.assert_intact()
    _assert_rootfs_intact(rootfs, before)
    assert not mounts_under(run_root)


def test_a_container_planting_symlinks_in_a_shared_host_directory_cannot_steer_teardown(run_root, canary):
    """A host directory shared read-write (a volume): the container plants symlinks to the host
    canary in it, over its own files and beside the mount, tries to move the mount away; then
    `kata-runtime delete --force`. Teardown unmounts the recorded mount ID only: the canary, the
    volume and what the container wrote there (as the spec allowed) stay."""
    volume = os.path.join(run_root, "volume")
    os.mkdir(volume)
    Path(volume, "user-file").write_text("user data\n")
    script = f"""
        bb=/bin/busybox
        $bb ln -s {canary.mount} /vol/to-canary && echo LINKED
        $bb ln -s {canary.mount}/secret /vol/secret-link
        $bb rm /vol/user-file && $bb ln -s {canary.mount} /vol/user-file
        $bb mv /vol /vol.moved 2>/dev/null && echo MOVED_MOUNT
        echo written > /vol/by-container
        echo done > /attack-done
        exec $bb sleep 600
    """
    bundle = make_bundle(os.path.join(run_root, "b"), ["sh", "-c", script], mounts=[
        {"destination": "/vol", "type": "bind", "source": volume, "options": ["rbind", "rw"]}])
    runtime = Runtime(run_root)
    created = runtime("create", "c1", "--bundle", bundle)
    assert created.returncode == 0, created.stderr
    try:
        state = json.loads(Path(run_root, "state", "c1", "state.json").read_text())
        assert len(state["host_mounts"]) == 1
        assert runtime("start", "c1").returncode == 0
        done_file = os.path.join(bundle, "rootfs", "attack-done")
        deadline = time.monotonic() + ATTACK_TIMEOUT_S
        while not os.path.exists(done_file):
            assert time.monotonic() < deadline, "the container's attack script never finished"
            time.sleep(0.1)
    finally:
        deleted = runtime("delete", "--force", "c1")
    assert deleted.returncode == 0, deleted.stderr
    canary.assert_intact()
    assert sorted(os.listdir(volume)) == ["by-container", "secret-link", "to-canary", "user-file"]
    assert os.readlink(os.path.join(volume, "to-canary")) == canary.mount
    assert Path(volume, "by-container").read_text() == "written\n"
    assert not mounts_under(run_root)
