"""The grpccache client refuses a handed-over VM that is not what it claims (no VM booted)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import pytest

from factory.handover import HandoverError, check_handed_vm
from factory.hypervisor.qemu import QemuState
from hostos import process

VM_ID = "0f0e0d0c-aaaa-4bbb-8ccc-123456789abc"


@pytest.fixture
def fake_qemu(tmp_path):
    """A live process whose command line names VM_ID as QEMU's would, and its run directory."""
    (tmp_path / VM_ID).mkdir()
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "-name", f"kata-vm-{VM_ID}"],
                             stdin=subprocess.PIPE)
    try:
        state = QemuState(id=VM_ID, run_root=str(tmp_path), pid=child.pid,
                          pid_start_time=_started(child.pid), accelerator="tcg", num_vcpus=1,
                          max_vcpus=1, memory_mib=128, max_memory_mib=128, memory_slots=1)
        yield state
    finally:
        child.stdin.close()
        child.wait(timeout=30)


def _started(pid: int) -> int:
    # Popen returns after fork, maybe before exec: wait (bounded) until /proc shows the new command
    # line. The start time is fixed from the fork on.
    deadline = time.monotonic() + 30
    while f"kata-vm-{VM_ID}".encode() not in open(f"/proc/{pid}/cmdline", "rb").read():
        assert time.monotonic() < deadline, "the stand-in QEMU never exec'd"
        time.sleep(0.01)
    started = process.start_time(pid)
    assert started is not None
    return started


def test_a_genuine_handover_passes(fake_qemu):
    check_handed_vm(VM_ID, fake_qemu, fake_qemu.run_root)


@pytest.mark.parametrize("bad_id", ["../etc", "a/b", "", ".", "..", "x" * 65, "-rf", "a b"])
def test_an_id_that_is_not_a_plain_name_is_refused(fake_qemu, bad_id):
    with pytest.raises(HandoverError, match="not a valid VM ID"):
        check_handed_vm(bad_id, dataclasses.replace(fake_qemu, id=bad_id), fake_qemu.run_root)


def test_state_for_another_vm_is_refused(fake_qemu):
    with pytest.raises(HandoverError, match="not a valid VM ID"):
        check_handed_vm("other", fake_qemu, fake_qemu.run_root)


def test_a_run_root_other_than_ours_is_refused(fake_qemu, tmp_path):
    with pytest.raises(HandoverError, match="not this client's"):
        check_handed_vm(VM_ID, dataclasses.replace(fake_qemu, run_root="/"), fake_qemu.run_root)


def test_a_run_directory_that_is_a_symlink_is_refused(fake_qemu, tmp_path):
    os.rmdir(tmp_path / VM_ID)
    os.symlink("/", tmp_path / VM_ID)
    with pytest.raises(HandoverError, match="not a directory"):
        check_handed_vm(VM_ID, fake_qemu, fake_qemu.run_root)


def test_a_pid_that_is_not_that_vms_qemu_is_refused(fake_qemu):
    ours = dataclasses.replace(fake_qemu, pid=os.getpid(), pid_start_time=process.start_time(os.getpid()))
    with pytest.raises(HandoverError, match="is not that VM's QEMU"):
        check_handed_vm(VM_ID, ours, fake_qemu.run_root)


@pytest.mark.parametrize("pid", [0, 1, -5])
def test_pids_that_would_signal_everyone_are_refused(fake_qemu, pid):
    with pytest.raises(HandoverError, match="not running"):
        check_handed_vm(VM_ID, dataclasses.replace(fake_qemu, pid=pid), fake_qemu.run_root)


def test_a_stale_start_time_is_refused(fake_qemu):
    with pytest.raises(HandoverError, match="not running"):
        check_handed_vm(VM_ID, dataclasses.replace(fake_qemu, pid_start_time=fake_qemu.pid_start_time + 1),
                        fake_qemu.run_root)
