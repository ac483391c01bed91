"""Facts about host files (a kernel's digest, QEMU's version) computed once per file identity.

Every sandbox is a new kata-runtime process, and the template check needs the kernel's and the
initrd's sha256 and `qemu --version`: about 65 ms of hashing 70 MB and starting QEMU, each time.
The answers only change when the file does, so they are kept on disk keyed by the file's identity
(device, inode, size, mtime, ctime): a replaced or rewritten file is hashed again, an unchanged one
costs a stat. The cache is a convenience: unreadable or unwritable, everything is computed as before.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from factory import assets
from factory.hypervisor import binary
from hostos import files

# Beside the guest kernel the bootstrap fetched: a host-only directory (root's), never the guest's.
CACHE_FILE = assets.STATE_DIR / "host-facts.json"
# A cache grown past this many entries (paths come and go with installs) starts over.
MAX_ENTRIES = 64


def sha256(path: str) -> str:
    return _fact("sha256", path, _hash_file)


def qemu_version(path: str) -> str:
    return _fact("qemu_version", path, binary.qemu_version)


def _hash_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _identity(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _fact(kind: str, path: str, compute: Callable[[str], str], cache_file: Path | None = None) -> str:
    cache_file = cache_file or CACHE_FILE
    key = f"{kind}:{os.path.abspath(path)}"
    try:
        before = _identity(path)
    except OSError:
        return compute(path)  # let the computation say what is wrong with the path
    cache = _load(cache_file)
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("identity") == before and isinstance(entry.get("value"), str):
        return str(entry["value"])
    value = compute(path)
    try:
        unchanged = _identity(path) == before  # not rewritten while we read it
    except OSError:
        unchanged = False
    if unchanged and not value.startswith("unknown"):
        if len(cache) >= MAX_ENTRIES:
            cache = {}
        cache[key] = {"identity": before, "value": value}
        _store(cache_file, cache)
    return value


def _load(cache_file: Path) -> dict[str, object]:
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store(cache_file: Path, cache: dict[str, object]) -> None:
    try:
        cache_file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        files.write_atomic(str(cache_file), json.dumps(cache, sort_keys=True).encode(), mode=0o644)
    except OSError:
        pass  # a read-only state directory costs speed, not correctness
