#!/usr/bin/env python3
"""Fetch the pinned Debian kernel package and unpack a directly bootable guest kernel.

Usage (from the project bootstrap, as root):

    python3 tools/guest_kernel.py --cache-dir /var/cache/kata-vmfactory/kernel
    python3 tools/guest_kernel.py --cache-dir /var/cache/kata-vmfactory/kernel --print
    python3 tools/guest_kernel.py --repin      # move the pin to Debian's current kernel

The pin is tools/guest_kernel.pin.json: package, exact version and the sha256 of its .deb.
`apt-get download package=version` fetches exactly that; a digest mismatch is refused. When the
archive no longer carries the pinned version, the error says to run --repin.

Result, under the cache directory:

    linux-image-6.1.0-NN-amd64_<version>/   dpkg -x of the package, plus
        vmlinux                             uncompressed ELF with the PVH note (boots with -kernel,
                                            skipping firmware and the ~3.5 s XZ decompression
                                            under TCG)
        kernel.json                         what the build and the factory need to know
    current -> linux-image-..._<version>    replaced atomically once the directory is complete

Idempotent: when `current` is the pinned package, nothing is run (no apt at all). A cached
kernel that is not the pin is replaced.

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

META_PACKAGE = "linux-image-amd64"  # only for --repin: what Debian's current kernel is
# The one kernel the project builds and tests with: the guest kernel decides boot time, template
# metadata and hot-plug behaviour, so it moves only by a reviewed change of this file.
PIN_FILE = Path(__file__).resolve().parent / "guest_kernel.pin.json"
REPIN_HINT = (
    "move the pin with `tools/guest_kernel.py --repin` (records the kernel linux-image-amd64 "
    "names today, with its sha256), then run the README's test command and commit the pin file"
)
XZ_MAGIC = b"\xfd7zXZ\x00"
KERNEL_JSON = "kernel.json"
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


def _download(package: str, version: str, into: Path) -> Path:
    """apt-get download package=version into a new directory under `into`; the .deb's path."""
    download_dir = into / "download"
    download_dir.mkdir()
    # apt drops to the _apt user for downloads: let it write here (no warning, sandboxed).
    os.chmod(into, 0o755)
    os.chmod(download_dir, 0o777)
    log(f"downloading {package}={version}")
    try:
        _run(["apt-get", "download", f"{package}={version}"], f"downloading {package}", download_dir)
    except KernelError as first:
        # Stale package lists are the common cause; a second miss means the archive dropped it.
        log(f"download failed ({first}); running apt-get update and retrying")
        _run(["apt-get", "update"], "apt-get update (needed because the download failed)")
        try:
            _run(["apt-get", "download", f"{package}={version}"], f"downloading {package}", download_dir)
        except KernelError as exc:
            raise KernelError(
                f"the pinned guest kernel {package}={version} cannot be downloaded ({exc}); "
                f"when the archive no longer carries it, {REPIN_HINT}"
            ) from exc
    debs = sorted(download_dir.glob("*.deb"))
    if len(debs) != 1:
        raise KernelError(f"apt-get download {package} left {len(debs)} .deb files, expected 1")
    return debs[0]


def _unpack(cache_dir: Path, pin: dict, final_dir: Path) -> dict:
    package, version = pin["package"], pin["version"]
    started = time.monotonic()
    staging = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", dir=cache_dir))
    try:
        deb = _download(pin["package"], pin["version"], staging)
        digest = file_sha256(deb)
        if digest != pin["deb_sha256"]:
            raise KernelError(
                f"{deb.name} has sha256 {digest}, the pin says {pin['deb_sha256']}: the archive "
                f"serves different contents under {pin['package']}={pin['version']}; check the apt "
                f"sources, then {REPIN_HINT}"
            )
        root = staging / "root"
        log(f"unpacking {deb.name} ({deb.stat().st_size // (1 << 20)} MiB)")
        _run(["dpkg", "-x", str(deb), str(root)], f"unpacking {deb.name}")

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
            "deb_sha256": digest,
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


def read_pin(pin_file: Path = PIN_FILE) -> dict:
    """The pinned kernel package: {"package", "version", "deb_sha256"}."""
    try:
        pin = json.loads(pin_file.read_text())
    except (OSError, ValueError) as exc:
        raise KernelError(f"cannot read the kernel pin {pin_file}: {exc}; {REPIN_HINT}") from exc
    missing = [key for key in ("package", "version", "deb_sha256") if not isinstance(pin.get(key), str)]
    if missing:
        raise KernelError(f"kernel pin {pin_file} lacks {', '.join(missing)}; {REPIN_HINT}")
    return pin


def matches_pin(info: Optional[dict], pin: dict) -> bool:
    """Is the unpacked kernel `info` the pinned package? Debian never reuses a version for other
    contents, so a directory unpacked before digests were recorded matches on name and version."""
    if info is None or (info.get("package"), info.get("version")) != (pin["package"], pin["version"]):
        return False
    return info.get("deb_sha256", pin["deb_sha256"]) == pin["deb_sha256"]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_kernel(cache_dir: Path, pin: dict) -> dict:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        # Two bootstraps at once would race on the staging/rename steps.
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_kernel_locked(cache_dir, pin)


def _ensure_kernel_locked(cache_dir: Path, pin: dict) -> dict:
    current = read_kernel_json(cache_dir / CURRENT_LINK)
    if matches_pin(current, pin):
        log(f"up to date: {pin['package']} {pin['version']} (the pin)")
        return current
    if current is not None:
        log(f"cached kernel {current.get('package')} {current.get('version')} is not the pin; replacing it")
    final_dir = cache_dir / _dir_name(pin["package"], pin["version"])
    info = read_kernel_json(final_dir)
    if not matches_pin(info, pin):
        info = _unpack(cache_dir, pin, final_dir)
    else:
        log(f"already unpacked: {final_dir}")
    _point_current(cache_dir, final_dir.name)
    return info


def repin(pin_file: Path = PIN_FILE) -> dict:
    """Point the pin at the kernel linux-image-amd64 names today; record its .deb's sha256."""
    package, version = lookup_versioned_package()
    with tempfile.TemporaryDirectory(prefix="guest-kernel-repin.") as tmp:
        deb = _download(package, version, Path(tmp))
        pin = {"package": package, "version": version, "deb_sha256": file_sha256(deb)}
    _write_atomic(pin_file, (json.dumps(pin, indent=2) + "\n").encode())
    log(f"pinned {package} {version} (sha256 {pin['deb_sha256']}) in {pin_file}; commit it")
    return pin


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, help="where kernels are unpacked")
    parser.add_argument(
        "--print", action="store_true", help="print kernel.json of `current` and do nothing else"
    )
    parser.add_argument(
        "--repin", action="store_true", help=f"point {PIN_FILE.name} at Debian's current kernel"
    )
    args = parser.parse_args(argv)
    if not args.repin and args.cache_dir is None:
        parser.error("--cache-dir is required (except with --repin)")
    try:
        if args.repin:
            print(json.dumps(repin(), indent=2))
            return 0
        if args.print:
            info = read_kernel_json(args.cache_dir / CURRENT_LINK)
            if info is None:
                raise KernelError(
                    f"{args.cache_dir / CURRENT_LINK} is missing or incomplete; run "
                    f"`python3 tools/guest_kernel.py --cache-dir {args.cache_dir}` first"
                )
        else:
            info = ensure_kernel(args.cache_dir, read_pin())
    except KernelError as exc:
        log(f"error: {exc}")
        return 1
    if args.print:
        print(json.dumps(info, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
