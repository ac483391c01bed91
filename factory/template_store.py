"""Templates that survive a reboot: a copy of the tmpfs template on disk.

Upstream keeps the template on tmpfs only, so every reboot (or a VMCache
server restart, which removes the template it made) pays a full guest boot
again. Here a new template is also saved to `template_persist_path`: the
memory file sparse (after zero-page punching only the pages the guest really
used are data), the device state and the metadata. When the tmpfs copy is
gone and the saved metadata equals what the configuration needs, restoring it
is a file copy instead of a boot; when it differs, the caller boots a new
template and saves that one over it.

A save is written into a sibling directory and renamed into place (after
fsync), so a crash mid-save leaves the previous copy or none, never half of
one that would pass the metadata check.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from factory.errors import TemplateError

MEMORY = "memory"
STATE = "state"
METADATA = "metadata.json"
# Copy in chunks: bounded memory for a multi-GiB guest.
CHUNK_BYTES = 8 * 1024 * 1024

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StoreReport:
    """What a save or restore did, for status, metrics and the benchmark."""
    seconds: float
    data_bytes: int  # bytes actually copied (the memory file's data regions and the state)
    disk_bytes: int  # blocks the saved copy occupies on disk


def _data_regions(fd: int, size: int) -> Iterator[tuple[int, int]]:
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole after offset
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        offset = end


def copy_sparse(src: Path, dst: Path) -> int:
    """Copies `src` to a new `dst`, leaving holes where `src` has them; returns bytes copied."""
    copied = 0
    src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(src_fd).st_size
            for start, end in _data_regions(src_fd, size):
                for offset in range(start, end, CHUNK_BYTES):
                    data = os.pread(src_fd, min(CHUNK_BYTES, end - offset), offset)
                    os.pwrite(dst_fd, data, offset)
                    copied += len(data)
            os.ftruncate(dst_fd, size)
            os.fsync(dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    return copied


def _disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.iterdir() if p.is_file())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(template_dir: Path, store: Path) -> StoreReport:
    """Saves the template in `template_dir` (memory, state, metadata.json) to `store`.

    :raise TemplateError: the copy could not be written (the tmpfs template is unaffected).
    """
    started = time.monotonic()
    staging = store.with_name(f".{store.name}.new")
    try:
        store.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        copied = copy_sparse(template_dir / MEMORY, staging / MEMORY)
        copied += copy_sparse(template_dir / STATE, staging / STATE)
        # The metadata last: a copy without it is never restored.
        copy_sparse(template_dir / METADATA, staging / METADATA)
        _fsync_dir(staging)
        old = store.with_name(f".{store.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if store.exists():
            os.rename(store, old)
        os.rename(staging, store)
        _fsync_dir(store.parent)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise TemplateError(f"cannot save the VM template to {store}: {err}; free space there or unset "
                            "factory.template_persist_path (the template then dies with the host)") from err
    report = StoreReport(time.monotonic() - started, copied, _disk_bytes(store))
    log.info("template saved to %s in %.2f s (%.1f MiB on disk)", store, report.seconds, report.disk_bytes / 2**20)
    return report


def differences(store: Path, expected: dict[str, Any]) -> list[str]:
    """Why the copy in `store` cannot serve a configuration needing `expected`; empty when it can."""
    try:
        recorded = json.loads((store / METADATA).read_text())
    except FileNotFoundError:
        return [f"no saved template in {store}"]
    except (OSError, ValueError) as err:
        return [f"unreadable {store / METADATA}: {err}"]
    if not ((store / MEMORY).is_file() and (store / STATE).is_file()):
        return [f"incomplete saved template in {store}"]
    return [f"{key}: saved {recorded.get(key)!r}, config needs {value!r}"
            for key, value in expected.items() if recorded.get(key) != value]


def restore(store: Path, template_dir: Path) -> StoreReport:
    """Copies a saved template from `store` into `template_dir` (a mounted tmpfs).

    Check differences() first. :raise TemplateError: the copy failed.
    """
    started = time.monotonic()
    try:
        copied = copy_sparse(store / MEMORY, template_dir / MEMORY)
        copied += copy_sparse(store / STATE, template_dir / STATE)
        copy_sparse(store / METADATA, template_dir / METADATA)
    except OSError as err:
        raise TemplateError(f"cannot restore the VM template from {store}: {err}; remove {store} to "
                            "have it booted and saved again") from err
    report = StoreReport(time.monotonic() - started, copied, _disk_bytes(store))
    log.info("template restored from %s in %.2f s", store, report.seconds)
    return report
