"""A reproducible "newc" cpio archive, written without root (device nodes included).

Entries are collected first and written sorted by path, with inode numbers assigned in that
order, mtime 0 and owner root: the same entries give the same bytes, whatever order they were
added in and whoever runs the build.
"""

from __future__ import annotations

import io
import stat
from typing import BinaryIO, Dict, NamedTuple

from guest.initramfs import compress

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


class Entry(NamedTuple):
    mode: int  # including the S_IF* type bits
    data: bytes = b""  # file contents, or a symlink's target
    rdev_major: int = 0
    rdev_minor: int = 0


class CpioArchiveError(ValueError):
    pass


class CpioArchive:
    def __init__(self) -> None:
        self._entries: Dict[str, Entry] = {}

    @staticmethod
    def _clean(path: str) -> str:
        clean = path.strip("/")
        if not clean or ".." in clean.split("/"):
            raise CpioArchiveError(f"bad archive path {path!r}: give a path inside the root, like 'bin/sh'")
        return clean

    def _add(self, path: str, entry: Entry) -> None:
        path = self._clean(path)
        old = self._entries.get(path)
        if old is not None and old != entry:
            raise CpioArchiveError(f"{path!r} added twice with different contents")
        parent = path.rpartition("/")[0]
        if parent:
            self.add_dir(parent)
        self._entries[path] = entry

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        path = self._clean(path)
        existing = self._entries.get(path)
        if existing is not None:
            if not stat.S_ISDIR(existing.mode):
                raise CpioArchiveError(f"{path!r} is already a non-directory")
            return
        self._add(path, Entry(stat.S_IFDIR | mode))

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(path, Entry(stat.S_IFREG | mode, bytes(data)))

    def add_symlink(self, path: str, target: str) -> None:
        self._add(path, Entry(stat.S_IFLNK | 0o777, target.encode()))

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(path, Entry(stat.S_IFCHR | mode, b"", major, minor))

    def __contains__(self, path: str) -> bool:
        return self._clean(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def payload_bytes(self) -> int:
        return sum(len(e.data) for e in self._entries.values() if stat.S_ISREG(e.mode))

    def write_cpio(self, out: BinaryIO) -> None:
        for inode, path in enumerate(sorted(self._entries), start=1):
            _write_entry(out, inode, path, self._entries[path])
        _write_entry(out, 0, _TRAILER, Entry(0))

    def to_bytes(self) -> bytes:
        """The uncompressed newc archive (guest/initramfs/compress.py compresses it)."""
        raw = io.BytesIO()
        self.write_cpio(raw)
        return raw.getvalue()

    def to_gzip_bytes(self) -> bytes:
        return compress.compress(self.to_bytes(), "gzip")


def _pad(out: BinaryIO, length: int) -> None:
    out.write(b"\0" * (-length % 4))


def _write_entry(out: BinaryIO, inode: int, path: str, entry: Entry) -> None:
    name = path.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        inode, entry.mode, 0, 0, nlink, 0, len(entry.data),
        0, 0, entry.rdev_major, entry.rdev_minor, len(name), 0,
    )
    header = _MAGIC + b"".join(b"%08x" % value for value in fields)
    out.write(header)
    out.write(name)
    _pad(out, len(header) + len(name))
    out.write(entry.data)
    _pad(out, len(entry.data))
