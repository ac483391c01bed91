"""OCI bundle config.json: loading, the checks this runtime needs, sizing, and `spec`.

Only the parts a VM sandbox uses are read; everything is validated up front so
that create fails with one line naming the problem, before any VM exists.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from runtime.errors import KataRuntimeError

SUPPORTED_OCI_MAJOR = "1."
OCI_VERSION = "1.0.2"
MIB = 1024 * 1024


class SpecError(KataRuntimeError):
    """The bundle or its config.json cannot be used."""


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    args: list[str]
    env: list[str]
    cwd: str
    uid: int
    gid: int
    additional_gids: list[int]
    terminal: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BundleSpec:
    bundle: str
    oci_version: str
    rootfs: str  # absolute host path
    rootfs_readonly: bool
    hostname: str
    process: ProcessSpec
    annotations: dict[str, str]
    vcpus: int  # 0: not asked
    memory_mib: int  # 0: not asked


def parse_process(raw: Any, where: str) -> ProcessSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: process must be an object")
    args = raw.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise SpecError(f"{where}: process.args must be a non-empty list of strings, got {args!r}")
    env = raw.get("env", [])
    if not isinstance(env, list) or not all(isinstance(e, str) and "=" in e for e in env):
        raise SpecError(f"{where}: process.env must be a list of NAME=value strings, got {env!r}")
    cwd = raw.get("cwd", "/")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise SpecError(f"{where}: process.cwd must be an absolute path, got {cwd!r}")
    user = raw.get("user", {}) or {}
    uid, gid = user.get("uid", 0), user.get("gid", 0)
    gids = user.get("additionalGids", []) or []
    for name, value in (("uid", uid), ("gid", gid)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SpecError(f"{where}: process.user.{name} must be a non-negative integer, got {value!r}")
    if raw.get("terminal"):
        raise SpecError(f"{where}: process.terminal is true, but this runtime relays plain stdio only; set it to false")
    return ProcessSpec(list(args), list(env), cwd, uid, gid, list(gids))


def _resources(linux: dict[str, Any], where: str) -> tuple[int, int]:
    resources = linux.get("resources", {}) or {}
    cpu = resources.get("cpu", {}) or {}
    quota, period = cpu.get("quota"), cpu.get("period")
    vcpus = 0
    if quota is not None and period:
        if not isinstance(quota, int) or not isinstance(period, int) or period <= 0:
            raise SpecError(f"{where}: linux.resources.cpu quota/period must be integers, got {quota!r}/{period!r}")
        if quota > 0:
            vcpus = math.ceil(quota / period)
    limit = (resources.get("memory", {}) or {}).get("limit")
    memory = 0
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise SpecError(f"{where}: linux.resources.memory.limit must be an integer, got {limit!r}")
        if limit > 0:
            memory = math.ceil(limit / MIB)
    return vcpus, memory


def load_bundle(bundle: str) -> BundleSpec:
    bundle = os.path.abspath(bundle)
    where = os.path.join(bundle, "config.json")
    if not os.path.isdir(bundle):
        raise SpecError(f"bundle {bundle} is not a directory")
    try:
        raw = json.loads(Path(where).read_text())
    except FileNotFoundError:
        raise SpecError(f"bundle {bundle} has no config.json (make one with `kata-runtime spec`)") from None
    except ValueError as err:
        raise SpecError(f"{where} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: top level must be an object")
    version = raw.get("ociVersion")
    if not isinstance(version, str) or not version.startswith(SUPPORTED_OCI_MAJOR):
        raise SpecError(f"{where}: ociVersion {version!r} is not supported (need 1.x)")
    root = raw.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("path"), str):
        raise SpecError(f"{where}: root.path is missing")
    rootfs = root["path"] if os.path.isabs(root["path"]) else os.path.join(bundle, root["path"])
    if not os.path.isdir(rootfs):
        raise SpecError(f"{where}: root.path {rootfs} is not a directory")
    process = parse_process(raw.get("process"), where)
    vcpus, memory = _resources(raw.get("linux", {}) or {}, where)
    annotations = raw.get("annotations", {}) or {}
    return BundleSpec(bundle, version, rootfs, bool(root.get("readonly", False)), str(raw.get("hostname", "")),
                      process, {str(k): str(v) for k, v in annotations.items()}, vcpus, memory)


def find_executable(rootfs: str, process: ProcessSpec) -> str:
    """Resolves args[0] inside the rootfs as the guest will (PATH from the env)."""
    program = process.args[0]

    def runnable(path: str) -> bool:
        # lexists, not exists: busybox-style applets are absolute symlinks
        # that only resolve inside the guest's chroot.
        return os.path.lexists(os.path.join(rootfs, path.lstrip("/")))

    if "/" in program:
        path = program if program.startswith("/") else os.path.join(process.cwd, program)
        if runnable(path):
            return path
        raise SpecError(f"process.args[0] {program!r} not found in the rootfs {rootfs}")
    env_path = next((e.split("=", 1)[1] for e in process.env if e.startswith("PATH=")),
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    for directory in env_path.split(":"):
        candidate = os.path.join(directory or "/", program)
        if runnable(candidate):
            return candidate
    raise SpecError(f"process.args[0] {program!r} not found in the rootfs {rootfs} (PATH={env_path})")


def default_spec() -> dict[str, Any]:
    """What `kata-runtime spec` writes: runc's default, trimmed to what applies here."""
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "kata",
        "linux": {"resources": {}},
        "annotations": {},
    }
