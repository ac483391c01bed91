"""Template memory file handling: free all-zero pages, measure residency.

Pages the guest wrote zeros to still cost tmpfs memory; punching them out
(FALLOC_FL_PUNCH_HOLE) frees it, and clones read zeros there as before.
Only data regions are scanned (SEEK_DATA/SEEK_HOLE), so holes cost nothing.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
from typing import Callable, Iterator

from native import zeropages

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
PAGE_SIZE = 4096
# Read in chunks: bounded memory while scanning a multi-GiB file.
CHUNK_BYTES = 8 * 1024 * 1024

# The C library already loaded into this process: find_library("c") would run `ldconfig -p`
# (~7 ms) in every command that imports this module.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


@dataclasses.dataclass(frozen=True)
class PunchReport:
    pages_scanned: int
    zero_pages_freed: int

    @property
    def mib_saved(self) -> float:
        return self.zero_pages_freed * PAGE_SIZE / (1024 * 1024)


def _data_regions(fd: int, size: int) -> Iterator[tuple[int, int]]:
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after offset
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        offset = end


def _punch(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"punching a hole at {offset}+{length}: {os.strerror(err)}")


def punch_zero_pages(path: str, scan: Callable[[bytes, int], list[int]] = zeropages.zero_pages) -> PunchReport:
    scanned = freed = 0
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        for start, end in list(_data_regions(fd, size)):
            for chunk_start in range(start, end, CHUNK_BYTES):
                data = os.pread(fd, min(CHUNK_BYTES, end - chunk_start), chunk_start)
                scanned += (len(data) + PAGE_SIZE - 1) // PAGE_SIZE
                run_start = run_len = 0
                for index in scan(data, PAGE_SIZE) + [None]:
                    if index is not None and run_len and index == run_start + run_len:
                        run_len += 1
                        continue
                    if run_len:
                        _punch(fd, chunk_start + run_start * PAGE_SIZE, run_len * PAGE_SIZE)
                        freed += run_len
                    if index is not None:
                        run_start, run_len = index, 1
    finally:
        os.close(fd)
    return PunchReport(scanned, freed)


def residency(path: str) -> dict[str, int]:
    """Size and bytes actually allocated, for status."""
    st = os.stat(path)
    return {"size_bytes": st.st_size, "allocated_bytes": st.st_blocks * 512}
