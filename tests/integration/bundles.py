"""Busybox OCI bundles the sandbox tests build themselves."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

BUSYBOX = "/bin/busybox"  # Debian's busybox-static: runs in any rootfs
APPLETS = ("sh", "echo", "uname", "sleep", "cat", "id", "hostname", "true", "false", "ls", "touch")


def make_bundle(path: str, args: list[str], **spec_overrides) -> str:
    rootfs = Path(path, "rootfs")
    (rootfs / "bin").mkdir(parents=True)
    for d in ("proc", "tmp", "etc"):
        (rootfs / d).mkdir()
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("/bin/busybox", rootfs / "bin" / applet)
    spec = {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args,
                    "env": ["PATH=/bin", "HOME=/"], "cwd": "/"},
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "testbox",
        "linux": {"resources": {}},
    }
    spec.update(spec_overrides)
    Path(path, "config.json").write_text(json.dumps(spec))
    return path
