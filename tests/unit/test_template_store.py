"""The template's disk copy: sparse, complete or absent, and refused when it does not fit."""
import json
import os
from pathlib import Path

import pytest

from factory import template_store
from factory.errors import TemplateError

PAGE = 4096


def _template(directory: Path, metadata: dict) -> None:
    directory.mkdir()
    with open(directory / "memory", "wb") as f:
        f.truncate(64 * PAGE)
        f.seek(10 * PAGE)
        f.write(b"\x01" * PAGE)
    (directory / "state").write_bytes(b"device state")
    (directory / "metadata.json").write_text(json.dumps(metadata))


def test_save_then_restore_gives_the_same_bytes_and_keeps_holes(tmp_path):
    _template(tmp_path / "tmpfs", {"memory_mib": 1})
    saved = template_store.save(tmp_path / "tmpfs", tmp_path / "disk" / "template")
    memory = tmp_path / "disk" / "template" / "memory"
    assert memory.stat().st_size == 64 * PAGE
    assert saved.data_bytes < 4 * PAGE  # one data page and the state, not the 64-page file
    (tmp_path / "back").mkdir()
    template_store.restore(tmp_path / "disk" / "template", tmp_path / "back")
    for name in ("memory", "state", "metadata.json"):
        assert (tmp_path / "back" / name).read_bytes() == (tmp_path / "tmpfs" / name).read_bytes()


def test_a_saved_copy_is_replaced_whole_and_no_staging_is_left(tmp_path):
    store = tmp_path / "store"
    _template(tmp_path / "one", {"memory_mib": 1})
    template_store.save(tmp_path / "one", store)
    _template(tmp_path / "two", {"memory_mib": 2})
    template_store.save(tmp_path / "two", store)
    assert json.loads((store / "metadata.json").read_text()) == {"memory_mib": 2}
    assert sorted(os.listdir(tmp_path)) == ["one", "store", "two"]


def test_differences_name_what_does_not_match(tmp_path):
    store = tmp_path / "store"
    assert template_store.differences(store, {"memory_mib": 1}) == [f"no saved template in {store}"]
    _template(tmp_path / "tmpfs", {"memory_mib": 1, "kernel_params": ""})
    template_store.save(tmp_path / "tmpfs", store)
    assert template_store.differences(store, {"memory_mib": 1}) == []
    assert template_store.differences(store, {"memory_mib": 2}) == ["memory_mib: saved 1, config needs 2"]
    (store / "state").unlink()
    assert template_store.differences(store, {"memory_mib": 1}) == [f"incomplete saved template in {store}"]


def test_a_save_that_cannot_be_written_names_the_place_and_the_remedy(tmp_path):
    _template(tmp_path / "tmpfs", {})
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(TemplateError, match="cannot save the VM template to .*file/store.*template_persist_path"):
        template_store.save(tmp_path / "tmpfs", tmp_path / "file" / "store")
