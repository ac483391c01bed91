"""Host file facts are computed once per file identity and again when the file changes."""
from __future__ import annotations

import json
import os

from factory import hostfacts


def _counting(calls: list[str]):
    def compute(path: str) -> str:
        calls.append(path)
        return f"fact of {open(path).read()}"
    return compute


def test_a_fact_is_computed_once_for_an_unchanged_file_and_again_after_it_changes(tmp_path):
    cache, kernel, calls = tmp_path / "facts.json", tmp_path / "vmlinux", []
    kernel.write_text("one")
    assert hostfacts._fact("sha256", str(kernel), _counting(calls), cache) == "fact of one"
    assert hostfacts._fact("sha256", str(kernel), _counting(calls), cache) == "fact of one"
    assert len(calls) == 1
    kernel.write_text("two!")  # rewritten in place: size, mtime and ctime move
    assert hostfacts._fact("sha256", str(kernel), _counting(calls), cache) == "fact of two!"
    replacement = tmp_path / "new"
    replacement.write_text("three")
    os.replace(replacement, kernel)  # replaced: another inode
    assert hostfacts._fact("sha256", str(kernel), _counting(calls), cache) == "fact of three"
    assert len(calls) == 3


def test_kinds_and_paths_are_kept_apart(tmp_path):
    cache, a, b, calls = tmp_path / "facts.json", tmp_path / "a", tmp_path / "b", []
    a.write_text("a")
    b.write_text("b")
    assert hostfacts._fact("sha256", str(a), _counting(calls), cache) == "fact of a"
    assert hostfacts._fact("sha256", str(b), _counting(calls), cache) == "fact of b"
    assert hostfacts._fact("qemu_version", str(a), lambda p: "QEMU 7.2", cache) == "QEMU 7.2"
    assert len(json.loads(cache.read_text())) == 3


def test_a_cache_that_cannot_be_read_or_written_only_costs_the_computation(tmp_path):
    kernel, calls = tmp_path / "vmlinux", []
    kernel.write_text("x")
    unwritable = tmp_path / "file" / "facts.json"  # its parent is a file: mkdir fails
    (tmp_path / "file").write_text("")
    for _ in range(2):
        assert hostfacts._fact("sha256", str(kernel), _counting(calls), unwritable) == "fact of x"
    assert len(calls) == 2
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    assert hostfacts._fact("sha256", str(kernel), _counting(calls), garbage) == "fact of x"


def test_an_unknown_qemu_version_is_not_remembered(tmp_path):
    cache, qemu = tmp_path / "facts.json", tmp_path / "qemu"
    qemu.write_text("")
    assert hostfacts._fact("qemu_version", str(qemu), lambda p: "unknown (timed out)", cache).startswith("unknown")
    assert not cache.exists()


def test_the_real_sha256_matches_hashlib(tmp_path, monkeypatch):
    monkeypatch.setattr(hostfacts, "CACHE_FILE", tmp_path / "facts.json")
    data = tmp_path / "initrd"
    data.write_bytes(b"\0" * 3_000_000)
    import hashlib
    assert hostfacts.sha256(str(data)) == hashlib.sha256(b"\0" * 3_000_000).hexdigest()
