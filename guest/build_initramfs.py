#!/usr/bin/env python3
"""Build the guest's initramfs: busybox, init, kernel modules, Python and the agent.

    python3 guest/build_initramfs.py --kernel-json /var/cache/kata-vmfactory/kernel/current/kernel.json \\
        --source-root . --source-root /tmp/gen --out /tmp/initramfs.cpio.lz4

Agent sources are given as files (--agent-source, as the Bazel genrule does) or found under
--source-root directories (guest/agent/*.py, protocols/agent/{framing,agent_pb2}.py). Each file
lands at its import path, so a generated agent_pb2.py from bazel-out/.../bin/ maps to
protocols/agent/agent_pb2.py.

The output is reproducible: the same inputs give the same bytes (sorted entries, mtime 0,
owner 0, deterministic compression, hash-based .pyc files).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional

if __package__ in (None, ""):
    # Run as a script: make `guest.initramfs` importable from the source tree.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guest.initramfs.compress import DEFAULT_METHOD, METHODS, CompressionError, compress  # noqa: E402
from guest.initramfs.cpio import CpioArchive  # noqa: E402
from guest.initramfs.kmod import KernelModuleError, ModuleTree, read_module_bytes  # noqa: E402
from guest.initramfs.python_image import PythonImage, PythonImageError, base_interpreter, site_dir_of  # noqa: E402

# What a virtio-serial guest needs (console = agent channel, rng = entropy for clones, blk for
# block-device rootfs later) and the 9p set for sharing container rootfs from the host.
DEFAULT_MODULES = (
    "virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio virtio_pci virtio_console "
    "virtio_rng virtio_blk 9pnet netfs fscache 9p 9pnet_virtio"
).split()
# upb, protobuf's C extension: measured under TCG, interleaved in one run, against the pure-Python
# implementation: direct boot to agent answered 3.48 -> 3.30 s (5 boots each), template clone
# get_vm 185 -> 155 ms (10 each; the clone's first answer decodes and encodes on a cold translation
# cache, where C beats interpreted protobuf). It costs 0.9 MB more gzipped (libstdc++, libgcc_s).
DEFAULT_PROTOBUF_IMPL = "upb"
MODULE_DIR = "lib/modules"
MODULE_LIST = MODULE_DIR + "/load.list"
# Where the agent finds the container helper (guest/agent/containment.py names the same path).
CONTAIN_PATH = "sbin/vmf-contain"  # read by guest/init: one module name a line, in load order

# Applets guest/init (and a person debugging on the console) uses.
BUSYBOX_APPLETS = (
    "sh ash cat chroot dmesg echo insmod ip kill ln ls mkdir mknod mount poweroff ps reboot rm sleep "
    "sync test true false umount uname"
).split()

DEFAULT_AGENT_SOURCES = (
    "guest/agent/*.py",
    "protocols/__init__.py",
    "protocols/agent/__init__.py",
    "protocols/agent/framing.py",
    "protocols/agent/agent_pb2.py",
)
REQUIRED_AGENT_MODULES = ("guest/agent/main.py", "protocols/agent/framing.py", "protocols/agent/agent_pb2.py")
AGENT_ENTRY = "guest.agent.main"
# Run in the probe after importing the entry module, so that what protobuf imports lazily on
# the first (de)serialization is packed too.
AGENT_EXERCISE = """
from guest.agent import lazyimports  # the launcher's, packed with what it imports
from protocols.agent import agent_pb2
from protocols.agent.framing import FrameDecoder, encode_frame
request = agent_pb2.Request(id=1, check=agent_pb2.CheckRequest())
message = agent_pb2.GuestMessage()
message.response.id = 1
message.response.check.agent_version = "probe"
message.event.cpu_mem_onlined.cpus.extend([1, 2])
for payload in FrameDecoder().feed(encode_frame(request.SerializeToString())):
    agent_pb2.Request.FromString(payload).WhichOneof("kind")
agent_pb2.GuestMessage.FromString(message.SerializeToString())
"""
# Test-only helpers that must never end up in the image even if something imports them.
EXCLUDED_MODULES = ("guest.agent.fakeroot",)

_BAZEL_OUT = re.compile(r"^(?:.*/)?bazel-out/[^/]+/(?:bin|genfiles)/")


class BuildError(Exception):
    pass


def import_path(path: str, roots: List[str]) -> str:
    """Where a source file lives in the import tree (relative path like guest/agent/main.py)."""
    stripped = _BAZEL_OUT.sub("", path)
    if stripped != path:
        return stripped
    absolute = os.path.abspath(path)
    for root in roots:
        rel = os.path.relpath(absolute, os.path.abspath(root))
        if not rel.startswith(".."):
            return rel
    if not os.path.isabs(path) and not path.startswith(".."):
        return os.path.normpath(path)
    raise BuildError(f"cannot tell the import path of {path}: give a --source-root that contains it")


def collect_agent_sources(explicit: List[str], roots: List[str]) -> Dict[str, str]:
    """import path -> file, for every agent source."""
    sources: Dict[str, str] = {}
    if explicit:
        for path in explicit:
            sources[import_path(path, roots)] = path
    else:
        for pattern in DEFAULT_AGENT_SOURCES:
            for root in roots:
                for path in sorted(glob.glob(os.path.join(root, pattern))):
                    sources.setdefault(os.path.relpath(path, root), path)
    missing = [m for m in REQUIRED_AGENT_MODULES if m not in sources]
    if missing:
        raise BuildError(
            f"agent sources are missing {', '.join(missing)} (searched {roots}); protocols/agent/agent_pb2.py is "
            "generated: `python -m grpc_tools.protoc -I. --python_out=DIR protocols/agent/agent.proto` and add "
            "--source-root DIR"
        )
    return sources


def stage_agent_tree(sources: Dict[str, str], tree: str) -> None:
    for rel, path in sources.items():
        if not rel.endswith(".py"):
            continue
        target = os.path.join(tree, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(path, target)
    # Regular packages import faster than namespace packages and behave the same everywhere.
    for dirpath, _dirnames, _filenames in os.walk(tree):
        if dirpath != tree and not os.path.exists(os.path.join(dirpath, "__init__.py")):
            open(os.path.join(dirpath, "__init__.py"), "w").close()


def add_base_system(archive: CpioArchive, init: str, busybox: str, contain: Optional[str] = None) -> None:
    for directory in ("dev", "proc", "sys", "tmp", "run", "root", "etc", "bin", "sbin", "usr/bin", "mnt", "newroot"):
        archive.add_dir(directory)
    # The kernel opens /dev/console for init's stdio before init can mount devtmpfs.
    archive.add_char_device("dev/console", 5, 1, 0o600)
    archive.add_char_device("dev/null", 1, 3, 0o666)
    with open(init, "rb") as f:
        archive.add_file("init", f.read(), 0o755)
    with open(busybox, "rb") as f:
        archive.add_file("bin/busybox", f.read(), 0o755)
    for applet in BUSYBOX_APPLETS:
        archive.add_symlink(f"bin/{applet}", "busybox")
    if contain is not None:
        with open(contain, "rb") as f:
            archive.add_file(CONTAIN_PATH, f.read(), 0o755)


def add_kernel_modules(archive: CpioArchive, modules_dir: str, names: List[str]) -> List[str]:
    tree = ModuleTree(modules_dir)
    order = tree.load_order(names)
    for module in order:
        archive.add_file(f"{MODULE_DIR}/{module.name}.ko", read_module_bytes(module.path))
    archive.add_file(MODULE_LIST, "".join(m.name + "\n" for m in order).encode())
    return [m.name for m in order]


def build(args: argparse.Namespace) -> CpioArchive:
    with open(args.kernel_json) as f:
        kernel = json.load(f)
    archive = CpioArchive()
    add_base_system(archive, args.init, args.busybox, args.contain)
    loaded = add_kernel_modules(archive, kernel["modules_dir"], args.modules)
    log(f"kernel modules ({kernel['release']}), load order: {' '.join(loaded)}")

    sources = collect_agent_sources(args.agent_source, args.source_root)
    image = PythonImage(archive, args.python, strip=not args.no_strip)
    exclude = list(EXCLUDED_MODULES)
    if args.protobuf_impl == "python":
        exclude.append("google._upb")
    with tempfile.TemporaryDirectory() as tree:
        stage_agent_tree(sources, tree)
        site_dirs = [site_dir_of("google.protobuf")]
        # The probe must pick the implementation the guest will end up with.
        env = {"PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": args.protobuf_impl}
        image.add_agent(tree, site_dirs, AGENT_ENTRY, AGENT_EXERCISE, exclude=exclude, env=env)
    image.add_interpreter()
    counts = image.counts
    log(
        f"python: {counts['stdlib']} stdlib + {counts['agent']} agent/protobuf modules, "
        f"{counts['extensions']} extension modules, {counts['libraries']} shared libraries "
        f"(protobuf implementation: {args.protobuf_impl})"
    )
    return archive


def log(message: str) -> None:
    print(f"build_initramfs: {message}", file=sys.stderr, flush=True)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel-json", required=True, help="kernel.json written by tools/guest_kernel.py")
    parser.add_argument("--busybox", default="/bin/busybox", help="a static busybox")
    parser.add_argument("--init", default=os.path.join(here, "init"), help="the guest's /init script")
    parser.add_argument("--contain", default=None,
                        help="the static vmf-contain helper (bazel build //guest:vmf-contain)")
    parser.add_argument("--agent-source", action="append", default=[], help="an agent source file (repeat)")
    parser.add_argument(
        "--source-root", action="append", default=[],
        help="directory the agent sources' import paths are relative to (repeat; default: the current directory)",
    )
    parser.add_argument("--python", default=None,
                        help="interpreter to pack (default: /usr/bin/pythonX.Y of this version, else the venv's base)")
    parser.add_argument(
        "--protobuf-impl", choices=("upb", "python"), default=DEFAULT_PROTOBUF_IMPL,
        help="upb (default): protobuf's C extension (needs libstdc++); python: its pure-Python implementation",
    )
    parser.add_argument("--modules", nargs="+", default=list(DEFAULT_MODULES), help="kernel modules to load")
    parser.add_argument("--no-strip", action="store_true", help="keep symbols in ELF files")
    parser.add_argument(
        "--compression", choices=METHODS, default=DEFAULT_METHOD,
        help="lz4 (default; legacy frame, needs the lz4 command): the fastest for the guest kernel to unpack "
             "under TCG; gzip; none",
    )
    parser.add_argument("--out", required=True, help="the compressed cpio archive to write")
    args = parser.parse_args(argv)
    if not args.source_root:
        args.source_root = ["."]
    if args.python is None:
        args.python = base_interpreter()
    return args


def main(argv: Optional[List[str]] = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    try:
        archive = build(args)
        data = compress(archive.to_bytes(), args.compression)
    except (BuildError, KernelModuleError, PythonImageError, CompressionError, OSError, ValueError) as exc:
        log(f"error: {exc}")
        return 1
    tmp = args.out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, args.out)
    log(
        f"wrote {args.out}: {len(archive)} entries, {archive.payload_bytes / 1e6:.1f} MB of files, "
        f"{len(data) / 1e6:.2f} MB ({args.compression}), in {time.monotonic() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
