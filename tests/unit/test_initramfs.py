"""guest/initramfs: the reproducible cpio writer and module dependency resolution."""
import gzip
import os
import shutil
import stat
import struct
import subprocess

import pytest

from guest.initramfs import compress
from guest.initramfs.cpio import CpioArchive, CpioArchiveError
from guest.initramfs.kmod import KernelModuleError, ModuleTree, modinfo


def sample_archive(order):
    archive = CpioArchive()
    steps = {
        "file": lambda: archive.add_file("usr/lib/x.pyc", b"\x00" * 7, 0o644),
        "exe": lambda: archive.add_file("bin/busybox", b"#!busybox", 0o755),
        "link": lambda: archive.add_symlink("bin/sh", "busybox"),
        "dev": lambda: archive.add_char_device("dev/console", 5, 1),
        "init": lambda: archive.add_file("init", b"#!/bin/sh\n", 0o755),
    }
    for name in order:
        steps[name]()
    return archive


def parse_newc(data):
    entries, pos = {}, 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, uid, mtime, size, rmaj, rmin, namesize = (fields[1], fields[2], fields[5], fields[6], fields[9],
                                                        fields[10], fields[11])
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        body = name_start + namesize
        body += -body % 4
        content = data[body : body + size]
        pos = body + size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return entries
        assert (uid, mtime) == (0, 0)
        entries[name] = (mode, content, rmaj, rmin)


def test_same_entries_in_any_order_give_the_same_bytes():
    one = sample_archive(["file", "exe", "link", "dev", "init"]).to_gzip_bytes()
    two = sample_archive(["init", "dev", "link", "exe", "file"]).to_gzip_bytes()
    assert one == two
    # gzip header: no mtime, no file name
    assert one[4:8] == b"\0\0\0\0" and one[3] & 0x08 == 0


def test_archive_contents_parse_back():
    entries = parse_newc(gzip.decompress(sample_archive(["file", "exe", "link", "dev", "init"]).to_gzip_bytes()))
    names = list(entries)
    assert names == sorted(names)
    assert set(names) >= {"bin", "usr", "usr/lib", "dev"}  # parents created
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"busybox"
    mode, _, major, minor = entries["dev/console"]
    assert stat.S_ISCHR(mode) and (major, minor) == (5, 1)
    assert entries["bin/busybox"][0] == stat.S_IFREG | 0o755
    assert entries["usr/lib/x.pyc"][1] == b"\x00" * 7


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs the cpio tool")
def test_gnu_cpio_lists_it(tmp_path):
    path = tmp_path / "a.cpio"
    path.write_bytes(gzip.decompress(sample_archive(["file", "exe", "link", "dev", "init"]).to_gzip_bytes()))
    out = subprocess.run(["cpio", "-it", "--quiet"], stdin=open(path, "rb"), capture_output=True, text=True, check=True)
    assert "bin/sh" in out.stdout.split() and "dev/console" in out.stdout.split()


@pytest.mark.skipif(shutil.which("lz4") is None, reason="needs the lz4 tool")
def test_lz4_is_the_legacy_frame_the_kernel_reads_and_reproducible():
    raw = sample_archive(["file", "exe", "link", "dev", "init"]).to_bytes()
    one, two = compress.compress(raw, "lz4"), compress.compress(raw, "lz4")
    assert one == two
    assert one[:4] == b"\x02\x21\x4c\x18"  # the legacy magic; the kernel refuses the newer frame
    assert subprocess.run(["lz4", "-d", "-c"], input=one, capture_output=True, check=True).stdout == raw


def test_uncompressed_and_unknown_methods():
    raw = sample_archive(["init"]).to_bytes()
    assert compress.compress(raw, "none") == raw
    assert gzip.decompress(compress.compress(raw, "gzip")) == raw
    with pytest.raises(compress.CompressionError, match="'zip' is not one of lz4, gzip, none"):
        compress.compress(raw, "zip")


def test_missing_lz4_tool_names_the_package_and_the_fallback(monkeypatch):
    monkeypatch.setattr(compress.shutil, "which", lambda name: None)
    with pytest.raises(compress.CompressionError, match="apt-get install lz4.*--compression gzip"):
        compress.compress(b"x", "lz4")


def test_conflicting_or_escaping_paths_are_refused():
    archive = CpioArchive()
    archive.add_file("etc/a", b"1")
    archive.add_file("etc/a", b"1")  # the same again is fine
    with pytest.raises(CpioArchiveError, match="twice"):
        archive.add_file("etc/a", b"2")
    with pytest.raises(CpioArchiveError, match="bad archive path"):
        archive.add_file("../etc/passwd", b"")
    with pytest.raises(CpioArchiveError, match="non-directory"):
        archive.add_file("etc/a/b", b"")


def fake_module(depends: str, name: str) -> bytes:
    """A minimal x86-64 ELF relocatable object with just a .modinfo section."""
    modinfo_data = f"license=GPL\0depends={depends}\0name={name}\0".encode()
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    data_off = 64
    strtab_off = data_off + len(modinfo_data)
    shoff = strtab_off + len(shstrtab)
    shoff += -shoff % 8
    header = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header += struct.pack("<HHIQQQIHHHHHH", 1, 0x3E, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    sections = struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    sections += struct.pack("<IIQQQQIIQQ", 1, 1, 2, 0, data_off, len(modinfo_data), 0, 0, 1, 0)
    sections += struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, strtab_off, len(shstrtab), 0, 0, 1, 0)
    body = header + modinfo_data + shstrtab
    return body + b"\0" * (shoff - len(body)) + sections


@pytest.fixture
def modules_dir(tmp_path):
    root = tmp_path / "lib/modules/6.1.0-test"
    layout = {
        "kernel/drivers/virtio/virtio_ring.ko": "",
        "kernel/drivers/virtio/virtio.ko": "",
        "kernel/drivers/virtio/virtio_pci.ko": "virtio_ring,virtio,crc_builtin",
        "kernel/drivers/char/hw_random/virtio-rng.ko": "virtio,virtio_ring",
        "kernel/fs/loop_a.ko": "loop_b",
        "kernel/fs/loop_b.ko": "loop_a",
    }
    for rel, depends in layout.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(fake_module(depends, os.path.basename(rel)[:-3].replace("-", "_")))
    (root / "modules.builtin").write_text("kernel/lib/crc_builtin.ko\n")
    return str(root)


def test_modinfo_reads_depends(modules_dir):
    with open(os.path.join(modules_dir, "kernel/drivers/virtio/virtio_pci.ko"), "rb") as f:
        info = modinfo(f.read(), "virtio_pci.ko")
    assert info["depends"] == ["virtio_ring,virtio,crc_builtin"]


def test_load_order_puts_dependencies_first_and_skips_builtins(modules_dir):
    tree = ModuleTree(modules_dir)
    order = [m.name for m in tree.load_order(["virtio_rng", "virtio_pci"])]
    assert order == ["virtio", "virtio_ring", "virtio_rng", "virtio_pci"]
    assert "crc_builtin" not in order  # in modules.builtin: no file needed


def test_missing_module_and_cycles_are_errors(modules_dir):
    tree = ModuleTree(modules_dir)
    with pytest.raises(KernelModuleError, match="'nosuch' not found"):
        tree.load_order(["nosuch"])
    with pytest.raises(KernelModuleError, match="cycle: loop_a -> loop_b -> loop_a"):
        tree.load_order(["loop_a"])


def test_not_an_elf_is_an_error():
    with pytest.raises(KernelModuleError, match="not a 64-bit"):
        modinfo(b"garbage" * 10, "bad.ko")
