"""template_path is never someone else's: a mount the factory did not make, or a symlink, is
refused and left exactly as it was (no VM is booted: refusal comes first)."""
from __future__ import annotations

import asyncio
import os

import pytest

from factory.errors import TemplateError
from factory.template import TemplateFactory
from hostos import mountinfo, mounts
from tests.unit.fakes import config

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


def test_a_foreign_mount_at_template_path_is_refused_and_left_alone(tmp_path):
    target = tmp_path / "template"
    target.mkdir()
    mounts.mount_tmpfs(str(target), 1)  # a user's tmpfs, not ours
    try:
        (target / "precious").write_text("user data")
        theirs = mountinfo.top_mount_at(str(target)).mount_id
        with pytest.raises(TemplateError, match="already a mount point that kata-vmfactory did not make"):
            asyncio.run(TemplateFactory.create(config(), str(target), str(tmp_path / "run")))
        assert mountinfo.top_mount_at(str(target)).mount_id == theirs
        assert (target / "precious").read_text() == "user data"
        asyncio.run(TemplateFactory(config(), str(target)).close())  # destroy refuses too
        assert mountinfo.top_mount_at(str(target)).mount_id == theirs
        assert (target / "precious").read_text() == "user data"
    finally:
        mounts.unmount_lazy(str(target))


def test_a_symlink_template_path_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("user data")
    os.symlink(victim, tmp_path / "template")
    with pytest.raises(TemplateError, match="is a symlink"):
        asyncio.run(TemplateFactory.create(config(), str(tmp_path / "template"), str(tmp_path / "run")))
    assert os.path.islink(tmp_path / "template")
    assert os.listdir(victim) == ["precious"] and mountinfo.top_mount_at(str(victim)) is None
