"""Owner records, the orphan reaper and the template lock, with stand-in processes instead of QEMU."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import factory.template
from factory import ownership, reaper
from factory.errors import TemplateError
from factory.hypervisor.rundir import RunDir
from factory.ownership import Owner, OwnerKind
from factory.template import creation_lock
from hostos import locks, process, sockets

# Bounds for waits on events in these tests, never expected durations.
WAIT_S = 30.0


@pytest.fixture
def run_root():
    with tempfile.TemporaryDirectory(prefix="kvr-", dir="/tmp") as root:
        yield root
        # A run directory's share is a read-only bind mount: only RunDir.remove takes it away.
        for name in os.listdir(root):
            if os.path.exists(os.path.join(root, name, "shared.mount")):
                RunDir(Path(root), name).remove()


def _dead_owner(kind: OwnerKind = OwnerKind.POOL) -> Owner:
    child = subprocess.Popen(["true"])
    child.wait()
    return Owner(kind, child.pid, 12345)  # reaped child: pid and start time name no live process


def _fake_qemu(run: RunDir) -> subprocess.Popen:
    """A process standing in for a daemonized QEMU: own session, recorded as QEMU records itself."""
    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    started = process.start_time(proc.pid)
    run.pidfile.write_text(str(proc.pid))
    run.state_file.write_text(json.dumps({"pid": proc.pid, "pid_start_time": started}))
    return proc


def _vm_dir(root: str, vm_id: str, owner: Owner | None) -> RunDir:
    run = RunDir(Path(root), vm_id)
    run.create()
    if owner is not None:
        ownership.write(run.path, owner)
    return run


def test_owner_record_round_trips_and_names_the_acting_kind(run_root):
    run = _vm_dir(run_root, "vm", None)
    assert ownership.read(run.path) is None
    with ownership.acting_as(OwnerKind.CONTAINER, "c1"):
        ownership.write(run.path, ownership.current())
    owner = ownership.read(run.path)
    assert owner == Owner(OwnerKind.CONTAINER, os.getpid(), process.start_time(os.getpid()), "c1")
    assert owner.is_alive()
    assert ownership.current().kind is OwnerKind.DIRECT  # reset after the block
    assert set(os.listdir(run.path)) == {"shared", "shared.rw", "shared.mount", "logs", "logs.mount",
                                         "owner.json"}  # no temporary file


def test_a_prepared_owner_record_is_replaced_whole_and_a_long_one_still_written(run_root):
    run = _vm_dir(run_root, "vm", Owner(OwnerKind.POOL, 1, 2))
    ownership.prepare(run.path)
    taker = Owner(OwnerKind.CONTAINER, 3, 4, "c" * 64)
    ownership.write(run.path, taker)
    assert ownership.read(run.path) == taker
    assert not (run.path / ownership.PREPARED_FILE).exists()  # used up: the next write is a plain one
    assert json.loads((run.path / ownership.PREVIOUS_FILE).read_text())["kind"] == "pool"  # the old inode, kept
    ownership.write(run.path, Owner(OwnerKind.DIRECT, 5, 6))
    assert ownership.read(run.path) == Owner(OwnerKind.DIRECT, 5, 6)
    # A record longer than the prepared file is written the plain way, whole.
    ownership.prepare(run.path)
    huge = Owner(OwnerKind.CONTAINER, 7, 8, "x" * (2 * ownership.PREPARED_SIZE))
    ownership.write(run.path, huge)
    assert ownership.read(run.path) == huge


def test_a_recycled_pid_is_not_the_owner():
    me = ownership.this_process(OwnerKind.POOL)
    assert not Owner(OwnerKind.POOL, me.pid, me.start_time + 1).is_alive()


def test_reaper_stops_orphans_and_leaves_live_owners_and_unowned_dirs(run_root):
    orphan = _vm_dir(run_root, "orphan", _dead_owner())
    kept = _vm_dir(run_root, "kept", ownership.this_process(OwnerKind.DIRECT))
    unowned = Path(run_root) / "template"
    unowned.mkdir()
    orphan_qemu, kept_qemu = _fake_qemu(orphan), _fake_qemu(kept)
    try:
        reaped = reaper.reap(run_root)
        assert [r.vm_id for r in reaped] == ["orphan"]
        assert reaped[0].qemu_pid == orphan_qemu.pid
        assert orphan_qemu.wait(WAIT_S) is not None
        assert not orphan.exists()
        assert kept_qemu.poll() is None and kept.exists() and unowned.is_dir()
        assert reaper.reap(run_root) == []  # idempotent
    finally:
        for proc in (orphan_qemu, kept_qemu):
            proc.kill()
            proc.wait()


def test_reaper_removes_a_run_dir_abandoned_before_its_owner_was_recorded(run_root):
    # Killed between mkdir and the owner record, which RunDir.create writes before anything else.
    abandoned, fresh = Path(run_root, "abandoned"), Path(run_root, "fresh")
    abandoned.mkdir()
    fresh.mkdir()
    old = abandoned.stat().st_mtime - reaper.ABANDONED_AFTER_S - 1
    os.utime(abandoned, (old, old))
    assert reaper.reap(run_root) == []
    assert not abandoned.exists() and fresh.exists()  # fresh: its launcher may be about to record itself


def test_the_owner_is_on_record_before_the_share_is_mounted(run_root):
    seen = []
    run = RunDir(Path(run_root), "vm")
    run.create(record_owner=lambda path: seen.append(sorted(os.listdir(path))))
    assert seen == [[]]


def test_reaper_filters_by_kind(run_root):
    _vm_dir(run_root, "shim-gone", _dead_owner(OwnerKind.CONTAINER))
    assert reaper.reap(run_root, (OwnerKind.POOL, OwnerKind.TEMPLATE)) == []
    assert [r.vm_id for r in reaper.reap(run_root)] == ["shim-gone"]


def test_reaper_never_deletes_through_a_bind_mount(run_root):
    if os.geteuid() != 0:
        pytest.skip("bind mounts need root")
    from hostos import mountinfo, mounts
    with tempfile.TemporaryDirectory(prefix="kvr-canary-", dir="/tmp") as host:
        canary = Path(host) / "canary"
        canary.write_text("host data")
        run = _vm_dir(run_root, "orphan", _dead_owner(OwnerKind.CONTAINER))
        # As the shim lays it out: made in the host's writable view, mounted in the exported one.
        (run.shared_writable_dir / "c1" / "rootfs").mkdir(parents=True)
        share = run.shared_dir / "c1" / "rootfs"
        mounts.bind(host, str(share), readonly=False)
        try:
            reaper.reap(run_root)
        finally:
            for mount in mountinfo.mounts_below(str(run.path)):
                mounts.unmount_lazy(mount.mount_point)
        assert canary.read_text() == "host data"
        assert not run.exists()


_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()  # holds until its stdin closes, or it is killed
"""


class LockHolder:
    """Another process holding the flock on `path` until released or SIGKILLed."""

    def __init__(self, path: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLDER, path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def __enter__(self) -> "LockHolder":
        assert self.proc.stdout.readline() == "held\n"
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait(WAIT_S)
        self.proc.stdin.close()
        self.proc.stdout.close()


def test_lock_has_one_holder_and_a_crash_releases_it(run_root):
    path = os.path.join(run_root, "template.lock")
    with LockHolder(path) as holder:
        with pytest.raises(locks.LockTimeoutError, match="stayed locked"):
            with locks.exclusive(path, 0):
                pass
        holder.proc.send_signal(signal.SIGKILL)  # never lets go on its own
        holder.proc.wait(WAIT_S)
        with locks.exclusive(path, WAIT_S):
            pass


def test_a_lock_file_its_holder_removed_is_never_locked_again(run_root):
    path = os.path.join(run_root, "template.lock")
    with locks.exclusive(path, WAIT_S):
        opened_before_removal = os.open(path, os.O_RDWR)  # a waiter's fd on the old file
        os.unlink(path)
    try:
        assert not locks._still_linked(opened_before_removal, path)
        with locks.exclusive(path, WAIT_S):
            assert os.path.exists(path)  # a new file, locked
    finally:
        os.close(opened_before_removal)


def test_template_lock_timeout_is_a_template_error(run_root, monkeypatch):
    template = os.path.join(run_root, "template")

    async def waiter():
        async with creation_lock(template):
            pass

    monkeypatch.setattr(factory.template, "CREATE_LOCK_TIMEOUT_S", 0)
    with LockHolder(template + ".lock"):
        with pytest.raises(TemplateError, match="waiting for the VM template"):
            asyncio.run(waiter())


def test_stale_socket_is_removed_and_a_live_one_kept(run_root):
    import socket
    live, stale = os.path.join(run_root, "live.sock"), os.path.join(run_root, "stale.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(live)
    server.listen()
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(stale)
    dead.close()  # the file stays, nobody listens: a SIGKILLed server's socket
    try:
        assert not sockets.remove_stale(live) and os.path.exists(live)
        assert sockets.remove_stale(stale) and not os.path.exists(stale)
        assert not sockets.remove_stale(stale)
    finally:
        server.close()
