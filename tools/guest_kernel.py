#!/usr/bin/env python3
"""Fetch Debian's generic kernel package and unpack a directly bootable guest kernel.

Usage (from the project bootstrap, as root):

    python3 tools/guest_kernel.py --cache-dir /var/cache/kata-vmfactory/kernel
    python3 tools/guest_kernel.py --cache-dir /var/cache/kata-vmfactory/kernel --print

Result, under the cache directory:

    linux-image-6.1.0-NN-amd64_<version>/   dpkg -x of the package, plus
        vmlinux                             uncompressed ELF with the PVH note (boots with -kernel,
                                            skipping firmware and the ~3.5 s XZ decompression
                                            under TCG)
        kernel.json                         what the build and the factory need to know
    current -> linux-image-..._<version>    replaced atomically once the directory is complete

Idempotent: when `current` is complete and apt's package lists have not changed since the last
lookup, nothing is run at all (apt-cache alone takes ~1.5 s on these machines because the
Docker-style apt configuration disables apt's binary cache).

Standard library only: it runs before the project venv exists.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

META_PACKAGE = "linux-image-amd64"
APT_LISTS_DIR = Path("/var/lib/apt/lists")
XZ_MAGIC = b"\xfd7zXZ\x00"
KERNEL_JSON = "kernel.json"
LOOKUP_JSON = "lookup.json"  # remembers the last apt answer and the lists it came from
CURRENT_LINK = "current"
# kernel.json layout version: bump when keys change so readers can refuse old files.
KERNEL_JSON_FORMAT = 1

# x86 boot protocol offsets (Documentation/x86/boot.rst)
_SETUP_SECTS_OFFSET = 0x1F1
_HEADER_MAGIC_OFFSET = 0x202  # "HdrS"
_PAYLOAD_OFFSET_OFFSET = 0x248
# ELF note that marks a PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY, owner "Xen").
_XEN_ELFNOTE_PHYS32_ENTRY = 18


class KernelError(Exception):
    """A step of the kernel acquisition failed; the message says which and what to do."""


def log(message: str) -> None:
    print(f"guest_kernel: {message}", file=sys.stderr, flush=True)


# --- apt -----------------------------------------------------------------------------------------


def _run(argv: list[str], what: str, cwd: Optional[Path] = None) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise KernelError(f"{what}: {argv[0]} not found ({exc}); is this a Debian host?") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise KernelError(
            f"{what}: `{' '.join(argv)}` exited {proc.returncode}: " + " | ".join(detail)
        )
    return proc.stdout


def apt_lists_fingerprint() -> str:
    """Digest of apt's package lists: apt-cache's answers can only change when this does."""
    digest = hashlib.sha256()
    try:
        entries = sorted(os.scandir(APT_LISTS_DIR), key=lambda e: e.name)
    except FileNotFoundError:
        return "no-lists"
    for entry in entries:
        if entry.name in ("lock", "partial") or not entry.is_file():
            continue
        st = entry.stat()
        digest.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _lookup_versioned_package() -> tuple[str, str]:
    out = _run(["apt-cache", "depends", META_PACKAGE], f"looking up {META_PACKAGE}")
    names = re.findall(r"^\s*Depends:\s*(linux-image-[0-9][^\s]*-amd64)\s*$", out, re.MULTILINE)
    if not names:
        raise KernelError(
            f"`apt-cache depends {META_PACKAGE}` names no linux-image-<abi>-amd64 package:\n{out}"
        )
    package = names[0]
    show = _run(
        ["apt-cache", "show", "--no-all-versions", package], f"looking up the version of {package}"
    )
    match = re.search(r"^Version:\s*(\S+)\s*$", show, re.MULTILINE)
    if not match:
        raise KernelError(f"`apt-cache show {package}` gives no Version field")
    return package, match.group(1)


def lookup_versioned_package() -> tuple[str, str]:
    """(package, version) of the kernel linux-image-amd64 currently points at."""
    try:
        return _lookup_versioned_package()
    except KernelError as first:
        log(f"lookup failed ({first}); running apt-get update and retrying")
    _run(["apt-get", "update"], "apt-get update (needed because the package lookup failed)")
    return _lookup_versioned_package()


# --- the bzImage ---------------------------------------------------------------------------------


def _candidate_payload_offsets(bzimage: bytes) -> Iterator[int]:
    # The setup header says where the compressed payload starts; check that first, then fall back
    # to every XZ magic in the file (a stray match simply fails to decompress).
    if bzimage[_HEADER_MAGIC_OFFSET : _HEADER_MAGIC_OFFSET + 4] == b"HdrS":
        setup_sects = bzimage[_SETUP_SECTS_OFFSET] or 4
        (payload_offset,) = struct.unpack_from("<I", bzimage, _PAYLOAD_OFFSET_OFFSET)
        offset = (setup_sects + 1) * 512 + payload_offset
        if bzimage[offset : offset + len(XZ_MAGIC)] == XZ_MAGIC:
            yield offset
    offset = bzimage.find(XZ_MAGIC)
    while offset >= 0:
        yield offset
        offset = bzimage.find(XZ_MAGIC, offset + 1)


def check_vmlinux(elf: bytes, source: str) -> None:
    """Refuse anything but an x86-64 ELF executable carrying the PVH entry note."""
    if elf[:4] != b"\x7fELF":
        raise KernelError(f"{source}: decompressed payload is not an ELF file (starts {elf[:4]!r})")
    if elf[4] != 2 or elf[5] != 1:
        raise KernelError(f"{source}: ELF is not 64-bit little-endian (class {elf[4]}, data {elf[5]})")
    e_type, e_machine = struct.unpack_from("<HH", elf, 16)
    if e_machine != 0x3E:
        raise KernelError(f"{source}: ELF machine is {e_machine:#x}, expected x86-64 (0x3e)")
    if e_type != 2:
        raise KernelError(f"{source}: ELF type is {e_type}, expected an executable (2)")
    if not _has_pvh_note(elf):
        raise KernelError(
            f"{source}: ELF has no PVH entry note (Xen note {_XEN_ELFNOTE_PHYS32_ENTRY}); "
            "QEMU cannot boot it directly with -kernel. Use a kernel built with CONFIG_PVH=y."
        )


def _has_pvh_note(elf: bytes) -> bool:
    (e_phoff,) = struct.unpack_from("<Q", elf, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 54)
    for index in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, e_phoff + index * e_phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def extract_vmlinux(bzimage_path: Path) -> bytes:
    """The uncompressed kernel ELF inside an XZ-compressed bzImage."""
    bzimage = bzimage_path.read_bytes()
    tried: list[str] = []
    for offset in _candidate_payload_offsets(bzimage):
        # The payload is followed by other data (the decompressor's trailer): a streaming
        # decompressor stops at the end of the XZ stream and leaves the rest in unused_data.
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            elf = decompressor.decompress(bzimage[offset:])
        except lzma.LZMAError as exc:
            tried.append(f"{offset:#x}: {exc}")
            continue
        if not decompressor.eof:
            tried.append(f"{offset:#x}: XZ stream truncated")
            continue
        check_vmlinux(elf, f"{bzimage_path} (XZ payload at {offset:#x})")
        log(f"XZ payload at offset {offset:#x}: {len(elf)} bytes of ELF with the PVH note")
        return elf
    raise KernelError(
        f"{bzimage_path}: no decompressible XZ payload found (tried: {tried or 'no XZ magic'}); "
        "is this an XZ-compressed x86 bzImage?"
    )


# --- the cache -----------------------------------------------------------------------------------


def _dir_name(package: str, version: str) -> str:
    return f"{package}_{version.replace(':', '%3a')}"


def read_kernel_json(directory: Path) -> Optional[dict]:
    """kernel.json of a complete kernel directory, or None if it is missing or incomplete."""
    try:
        info = json.loads((directory / KERNEL_JSON).read_text())
    except (OSError, ValueError):
        return None
    if info.get("format") != KERNEL_JSON_FORMAT:
        return None
    vmlinux = Path(info.get("vmlinux", ""))
    if not vmlinux.is_file() or vmlinux.stat().st_size != info.get("vmlinux_size"):
        return None
    if not Path(info.get("modules_dir", "")).is_dir():
        return None
    return info


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _point_current(cache_dir: Path, target_name: str) -> None:
    link = cache_dir / CURRENT_LINK
    if link.is_symlink() and os.readlink(link) == target_name:
        return
    tmp = cache_dir / f".{CURRENT_LINK}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target_name)  # relative, so the cache directory can move
    os.replace(tmp, link)
    log(f"{link} -> {target_name}")


def _unpack(cache_dir: Path, package: str, version: str, final_dir: Path) -> dict:
    started = time.monotonic()
    staging = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", dir=cache_dir))
    try:
        download_dir = staging / "download"
        download_dir.mkdir()
        # apt drops to the _apt user for downloads: let it write here (no warning, sandboxed).
        os.chmod(staging, 0o755)
        os.chmod(download_dir, 0o777)
        log(f"downloading {package}={version}")
        _run(["apt-get", "download", f"{package}={version}"], f"downloading {package}", download_dir)
        debs = sorted(download_dir.glob("*.deb"))
        if len(debs) != 1:
            raise KernelError(f"apt-get download {package} left {len(debs)} .deb files, expected 1")
        root = staging / "root"
        log(f"unpacking {debs[0].name} ({debs[0].stat().st_size // (1 << 20)} MiB)")
        _run(["dpkg", "-x", str(debs[0]), str(root)], f"unpacking {debs[0].name}")

        bzimages = sorted((root / "boot").glob("vmlinuz-*"))
        if len(bzimages) != 1:
            raise KernelError(f"{package} has {len(bzimages)} /boot/vmlinuz-* files, expected 1")
        release = bzimages[0].name[len("vmlinuz-") :]
        if not (root / "lib/modules" / release).is_dir():
            raise KernelError(f"{package} has no /lib/modules/{release} for kernel {release}")

        log(f"extracting vmlinux from {bzimages[0].name}")
        elf = extract_vmlinux(bzimages[0])
        _write_atomic(root / "vmlinux", elf)

        # Paths point at the final location; the staging directory is renamed there in one step.
        info = {
            "format": KERNEL_JSON_FORMAT,
            "package": package,
            "version": version,
            "release": release,
            "vmlinux": str(final_dir / "vmlinux"),
            "vmlinux_size": len(elf),
            "vmlinux_sha256": hashlib.sha256(elf).hexdigest(),
            "bzimage": str(final_dir / "boot" / bzimages[0].name),
            "modules_dir": str(final_dir / "lib/modules" / release),
        }
        _write_atomic(root / KERNEL_JSON, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
        if final_dir.exists():
            # An incomplete directory from an interrupted older layout: replace it.
            shutil.rmtree(final_dir)
        os.rename(root, final_dir)
        log(f"ready: {final_dir} in {time.monotonic() - started:.1f} s")
        return info
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_kernel(cache_dir: Path) -> dict:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        # Two bootstraps at once would race on the staging/rename steps.
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_kernel_locked(cache_dir)


def _ensure_kernel_locked(cache_dir: Path) -> dict:
    fingerprint = apt_lists_fingerprint()
    current = read_kernel_json(cache_dir / CURRENT_LINK)
    try:
        lookup = json.loads((cache_dir / LOOKUP_JSON).read_text())
    except (OSError, ValueError):
        lookup = {}
    if (
        current is not None
        and lookup.get("apt_lists_fingerprint") == fingerprint
        and _dir_name(lookup.get("package", ""), lookup.get("version", ""))
        == os.readlink(cache_dir / CURRENT_LINK)
    ):
        log(f"up to date: {current['package']} {current['version']} (apt lists unchanged)")
        return current

    try:
        package, version = lookup_versioned_package()
    except KernelError as exc:
        if current is None:
            raise
        log(f"WARNING: {exc}; keeping the cached kernel {current['package']} {current['version']}")
        return current
    log(f"{META_PACKAGE} -> {package} {version}")
    final_dir = cache_dir / _dir_name(package, version)
    info = read_kernel_json(final_dir)
    if info is None:
        info = _unpack(cache_dir, package, version, final_dir)
    else:
        log(f"already unpacked: {final_dir}")
    _point_current(cache_dir, final_dir.name)
    # Written last: the fast path is only taken once `current` is known to match the lookup.
    _write_atomic(
        cache_dir / LOOKUP_JSON,
        json.dumps(
            {"apt_lists_fingerprint": apt_lists_fingerprint(), "package": package, "version": version}
        ).encode(),
    )
    return info


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, required=True, help="where kernels are unpacked")
    parser.add_argument(
        "--print", action="store_true", help="print kernel.json of `current` and do nothing else"
    )
    args = parser.parse_args(argv)
    try:
        if args.print:
            info = read_kernel_json(args.cache_dir / CURRENT_LINK)
            if info is None:
                raise KernelError(
                    f"{args.cache_dir / CURRENT_LINK} is missing or incomplete; run "
                    f"`python3 tools/guest_kernel.py --cache-dir {args.cache_dir}` first"
                )
        else:
            info = ensure_kernel(args.cache_dir)
    except KernelError as exc:
        log(f"error: {exc}")
        return 1
    if args.print:
        print(json.dumps(info, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
