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


def default_kernel_path() -> str:
    return str(KERNEL_DIR / "vmlinux")


def default_initrd_path() -> str:
    # Resolved to the build output itself: every binary's runfiles link to the
    # same file, so the VMCache server and its clients agree on the path.
    return os.path.realpath(_RUNFILES_ROOT / "guest" / "initramfs.cpio.gz")


def kernel_info() -> dict[str, Any]:
    """What tools/guest_kernel.py recorded about the installed guest kernel ({} when none)."""
    try:
        return cast(dict[str, Any], json.loads((KERNEL_DIR / "kernel.json").read_text()))
    except (OSError, ValueError):
        return {}
