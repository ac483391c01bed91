"""Binding host directories into a VM's share (no VM): only below the share, recorded, undone."""
from __future__ import annotations

import os

import pytest

from factory import sharedfs as share
from factory.hypervisor.rundir import RunDir
from hostos import mountinfo

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


@pytest.fixture
def run(tmp_path):
    run = RunDir(tmp_path / "vms", "vm1")
    run.create()
    yield run
    run.remove()


@pytest.mark.parametrize("relative", ["../escape", "/abs", "a/../../b", "", "."])
def test_paths_outside_the_share_are_refused(run, tmp_path, relative):
    with pytest.raises(share.ShareError, match="must be relative"):
        share.bind_into_share(run, relative, str(tmp_path), readonly=True)


def test_a_rootfs_bind_is_nosuid_nodev_recorded_and_undone(run, tmp_path):
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    bound = share.bind_rootfs(run, "c1", str(rootfs), readonly=True)
    entry = mountinfo.by_id(bound.mount_id)
    assert entry.mount_point == str(run.shared_dir / "c1" / "rootfs")
    assert {"ro", "nosuid", "nodev"} <= set(entry.options.split(","))
    share.unbind(bound.mount_point, bound.mount_id)
    assert mountinfo.by_id(bound.mount_id) is None
    share.unbind(bound.mount_point, bound.mount_id)  # idempotent
    share.unbind("", 0)  # nothing recorded: nothing to do
