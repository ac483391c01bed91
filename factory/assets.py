"""Where the guest kernel and initramfs are when the config does not say.

The initramfs is a Bazel output that binaries and tests carry in their
runfiles, next to this package; the kernel comes from the bootstrap's cache.
"""
import json
import os
from pathlib import Path
from typing import Any, cast

STATE_DIR = Path(os.environ.get("KATA_VMFACTORY_STATE", "/var/cache/kata-vmfactory"))
KERNEL_DIR = STATE_DIR / "kernel" / "current"
# Not resolved: in runfiles each file is a symlink into the source tree, where no initramfs is.
_RUNFILES_ROOT = Path(__file__).parent.parent
# A data file of this library (an install copies it beside the programs).
KERNEL_PIN = _RUNFILES_ROOT / "tools" / "guest_kernel.pin.json"


def default_kernel_path() -> str:
    return str(KERNEL_DIR / "vmlinux")


def default_initrd_path() -> str:
    # Resolved to the build output itself: every binary's runfiles link to the
    # same file, so the VMCache server and its clients agree on the path.
    return os.path.realpath(_RUNFILES_ROOT / "guest" / "initramfs.cpio.lz4")


def kernel_pin() -> dict[str, Any]:
    """The pinned guest kernel (tools/guest_kernel.pin.json, the bootstrap's source of truth) and
    whether the installed one is it; {"Error": ...} when the pin cannot be read."""
    try:
        pin = json.loads(KERNEL_PIN.read_text())
        package, version, digest = pin["package"], pin["version"], pin["deb_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return {"Error": f"cannot read the kernel pin {KERNEL_PIN}: {err}"}
    installed = kernel_info()
    # Debian never reuses a version for other contents: name and version identify the package.
    matches = ((installed.get("package"), installed.get("version")) == (package, version)
               and installed.get("deb_sha256", digest) == digest)
    return {"Package": package, "Version": version, "DebSha256": digest, "CachedKernelMatches": matches}


def kernel_info() -> dict[str, Any]:
    """What tools/guest_kernel.py recorded about the installed guest kernel ({} when none)."""
    try:
        return cast(dict[str, Any], json.loads((KERNEL_DIR / "kernel.json").read_text()))
    except (OSError, ValueError):
        return {}
