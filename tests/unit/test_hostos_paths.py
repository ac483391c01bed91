"""Host path helpers against an adversary who writes where the host looks: symlinks, swapped
directories, mounts below a tree. Mount tests need root (the project's tests run as root)."""
from __future__ import annotations

import os

import pytest

from hostos import files, mountinfo, mounts, safetree

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


def test_remove_tree_never_follows_symlinks(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    tree = tmp_path / "tree"
    (tree / "a").mkdir(parents=True)
    os.symlink(victim, tree / "a" / "dir-link")
    os.symlink(victim / "keep", tree / "file-link")
    safetree.remove_tree(str(tree))
    assert not tree.exists() and (victim / "keep").read_text() == "x"


def test_remove_tree_on_a_symlink_removes_only_the_link(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    os.symlink(victim, tmp_path / "link")
    safetree.remove_tree(str(tmp_path / "link"))
    assert not os.path.lexists(tmp_path / "link") and (victim / "keep").exists()


def test_remove_tree_of_nothing_is_fine(tmp_path):
    safetree.remove_tree(str(tmp_path / "absent"))


@needs_root
def test_remove_tree_leaves_a_bind_mount_below_and_everything_in_it(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    tree = tmp_path / "tree"
    (tree / "mnt").mkdir(parents=True)
    (tree / "other").write_text("gone")
    mount_id = mounts.bind_recorded(str(victim), str(tree / "mnt"), readonly=False, nosuid_nodev=True)
    try:
        with pytest.raises(safetree.MountInTheWay, match="mnt is a mount point"):
            safetree.remove_tree(str(tree))
        assert (victim / "keep").read_text() == "x"
        assert not (tree / "other").exists()
    finally:
        assert mounts.unmount_recorded(str(tree / "mnt"), mount_id)
    safetree.remove_tree(str(tree))
    assert not tree.exists() and (victim / "keep").exists()


@needs_root
def test_remove_tree_refuses_a_mount_point_itself(tmp_path):
    target = tmp_path / "mnt"
    target.mkdir()
    mounts.mount_tmpfs(str(target), 1)
    try:
        (target / "f").write_text("x")
        with pytest.raises(safetree.MountInTheWay, match="is a mount point"):
            safetree.remove_tree(str(target))
        assert (target / "f").exists()
    finally:
        mounts.unmount_lazy(str(target))


@needs_root
def test_unmount_recorded_leaves_a_mount_that_replaced_the_recorded_one(tmp_path):
    """A directory swapped for a symlink, or another mount stacked on top, is not unmounted."""
    target = tmp_path / "mnt"
    target.mkdir()
    first = mounts.bind_recorded(str(tmp_path), str(target), readonly=True, nosuid_nodev=True)
    options = mountinfo.by_id(first).options.split(",")
    assert {"ro", "nosuid", "nodev"} <= set(options)
    mounts.mount_tmpfs(str(target), 1)
    stacked = mountinfo.top_mount_at(str(target)).mount_id
    try:
        with pytest.raises(OSError, match="covered by another mount"):
            mounts.unmount_recorded(str(target), first)
        assert mountinfo.top_mount_at(str(target)).mount_id == stacked
    finally:
        mounts.unmount_lazy(str(target))
        mounts.unmount_recorded(str(target), first)
    assert mountinfo.by_id(first) is None
    assert mounts.unmount_recorded(str(target), first) is False  # already gone: nothing to do


def test_mountinfo_unescapes_paths():
    assert mountinfo._unescape(r"/a\040b\134c") == "/a b\\c"


def test_write_atomic_refuses_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("host file")
    os.symlink(victim, tmp_path / "pid")
    with pytest.raises(files.SymlinkRefused, match="is a symlink"):
        files.write_atomic(str(tmp_path / "pid"), b"42\n")
    assert victim.read_text() == "host file"
    assert sorted(os.listdir(tmp_path)) == ["pid", "victim"]  # no temporary left


def test_write_atomic_replaces_or_refuses_an_existing_file(tmp_path):
    path = tmp_path / "f"
    files.write_atomic(str(path), b"one")
    files.write_atomic(str(path), b"two")
    assert path.read_bytes() == b"two"
    with pytest.raises(FileExistsError):
        files.write_atomic(str(path), b"three", replace=False)
    assert path.read_bytes() == b"two" and os.listdir(tmp_path) == ["f"]
