"""A VM's run directory without a VM: the read-only share, the capped log tmpfs, and a removal
that takes nothing but its own files (needs root to mount, as the project's tests run)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from factory.errors import HypervisorError
from factory.hypervisor.rundir import LOGS_MIB, RunDir
from hostos import mountinfo, mounts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


def _mounts_under(root: Path) -> list[str]:
    return [m.mount_point for m in mountinfo.mounts() if m.mount_point.startswith(str(root) + "/")]


def test_the_share_is_read_only_but_for_a_rootfs_bound_into_it(tmp_path):
    run = RunDir(tmp_path / "vms", "vm1")
    run.create()
    try:
        with pytest.raises(OSError, match="Read-only"):
            (run.shared_dir / "planted").mkdir()
        (run.shared_writable_dir / "c1" / "rootfs").mkdir(parents=True)
        assert (run.shared_dir / "c1" / "rootfs").is_dir()  # the host's directories show through
        logs = mountinfo.top_mount_at(str(run.logs_dir))
        assert logs.fstype == "tmpfs"
        assert os.statvfs(run.logs_dir).f_blocks * os.statvfs(run.logs_dir).f_frsize <= LOGS_MIB << 20
    finally:
        run.remove()
    assert not _mounts_under(tmp_path) and not run.path.exists()


def test_removal_leaves_a_bundle_still_bound_in_the_share_intact(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "file").write_text("data")
    run = RunDir(tmp_path / "vms", "vm1")
    run.create()
    (run.shared_writable_dir / "c1" / "rootfs").mkdir(parents=True)
    mounts.bind_recorded(str(bundle), str(run.shared_dir / "c1" / "rootfs"), readonly=False, nosuid_nodev=True)
    run.remove()  # the rootfs bind was never unmounted: the share's detach takes it along
    assert (bundle / "file").read_text() == "data"
    assert not _mounts_under(tmp_path) and not run.path.exists()


def test_a_mount_someone_else_left_in_the_run_dir_is_not_entered(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "file").write_text("data")
    run = RunDir(tmp_path / "vms", "vm1")
    run.create()
    (run.path / "stray").mkdir()
    mounts.bind_recorded(str(bundle), str(run.path / "stray"), readonly=False, nosuid_nodev=False)
    try:
        with pytest.raises(HypervisorError, match="stray is a mount point"):
            run.remove()
        assert (bundle / "file").read_text() == "data"
    finally:
        mounts.unmount_lazy(str(run.path / "stray"))
    run.remove()
    assert not _mounts_under(tmp_path) and not run.path.exists()


def test_remove_of_a_missing_run_dir_is_fine(tmp_path):
    RunDir(Path(tmp_path), "never").remove()
    RunDir(Path(tmp_path) / "no-root", "never").remove()


def test_a_run_root_too_long_for_socket_paths_is_a_config_error_naming_it(tmp_path):
    from factory.errors import ConfigError
    root = tmp_path / ("r" * 90)
    with pytest.raises(ConfigError, match="too long for Unix sockets.*use a shorter runtime.vm_run_root"):
        RunDir(root, "0f0e0d0c-aaaa-4bbb-8ccc-123456789abc").create()
    assert not root.exists()
