"""Installs kata-runtime and the VMCache server like a runtime, outside the Bazel output base.

bazel run //:install -- [--prefix /usr/local] [--sysconfdir /etc]         install
bazel run //:install -- [--prefix /usr/local] [--sysconfdir /etc] --uninstall

What goes where (containerd's BinaryName and Docker's `runtimes` point at <prefix>/bin):
  <prefix>/bin/kata-runtime, <prefix>/bin/kata-vmcache-server   launchers on PATH
  <prefix>/lib/kata-vmfactory/                                   the programs' Python code and Cython modules
  <prefix>/share/kata-vmfactory/vmlinux, initramfs.cpio.lz4      the guest kernel and image
  <sysconfdir>/kata-containers/configuration.toml               the default configuration, naming those assets
The launchers run on the project's pinned venv (tools/bootstrap.sh), which stays where it is.
Every file and directory install creates is listed in <prefix>/lib/kata-vmfactory/install-manifest.json;
--uninstall removes exactly those (a configuration edited since install is kept, and said so).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import py_compile
import shutil
import sys
from pathlib import Path

# The runfiles copy of the workspace: this file is <runfiles>/<workspace>/tools/install.py.
WORKSPACE = Path(__file__).parent.parent
PACKAGES = ("configuration", "factory", "hostos", "native", "protocols", "runtime", "vmcache")
STATE_DIR = Path(os.environ.get("KATA_VMFACTORY_STATE", "/var/cache/kata-vmfactory"))
MANIFEST = "install-manifest.json"
PROGRAMS = {"kata-runtime": "runtime.launch", "kata-vmcache-server": "vmcache.main"}

_LAUNCHER = """#!{python} -I
# Installed by kata-vmfactory (bazel run //:install); removed by its --uninstall.
import os, runpy, sys
sys.path.insert(0, {lib!r})
os.environ.setdefault("KATA_VMCACHE_SERVER", {server!r})
if os.path.exists({config!r}):
    os.environ.setdefault("KATA_CONF_FILE", {config!r})
# sys.argv[0] stays this launcher: kata-runtime starts its shim by running argv[0] again.
runpy.run_module({module!r}, run_name="__main__", alter_sys=False)
"""


class InstallError(Exception):
    """The install cannot go on; the message names the path and what to do."""


class Layout:
    def __init__(self, prefix: Path, sysconfdir: Path) -> None:
        self.bin = prefix / "bin"
        self.lib = prefix / "lib" / "kata-vmfactory"
        self.share = prefix / "share" / "kata-vmfactory"
        self.etc = sysconfdir / "kata-containers"
        self.manifest = self.lib / MANIFEST


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _configuration(layout: Layout) -> str:
    text = (WORKSPACE / "configuration" / "configuration.toml").read_text()
    text = text.replace('kernel = ""', f'kernel = "{layout.share / "vmlinux"}"', 1)
    return text.replace('initrd = ""', f'initrd = "{layout.share / "initramfs.cpio.lz4"}"', 1)


def install(layout: Layout, out=sys.stdout) -> None:
    if layout.manifest.exists():
        raise InstallError(f"already installed ({layout.manifest} exists); run with --uninstall first")
    kernel = STATE_DIR / "kernel" / "current" / "vmlinux"
    if not kernel.exists():
        raise InstallError(f"no guest kernel at {kernel}; run tools/bootstrap.sh (or ./bazelw) first")
    files: list[str] = []
    dirs: list[str] = []

    def mkdir(path: Path) -> None:
        for parent in reversed([path, *path.parents]):
            if not parent.exists():
                parent.mkdir(mode=0o755)
                dirs.append(str(parent))

    def put(target: Path, write) -> None:
        mkdir(target.parent)
        if target.exists() or target.is_symlink():
            raise InstallError(f"{target} exists and is not ours; move it away or choose another --prefix")
        write(target)
        files.append(str(target))

    for package in PACKAGES:
        for source in sorted((WORKSPACE / package).rglob("*")):
            if source.is_file() and source.suffix in (".py", ".so", ".toml") and "__pycache__" not in source.parts:
                target = layout.lib / source.relative_to(WORKSPACE)
                put(target, lambda t, s=source: shutil.copyfile(s, t))
                if target.suffix == ".py":
                    # Compiled now, so the programs never write (unrecorded) bytecode beside the install.
                    put(Path(importlib.util.cache_from_source(str(target))),
                        lambda t, s=target: py_compile.compile(str(s), cfile=str(t), doraise=True))
    pin = WORKSPACE / "tools" / "guest_kernel.pin.json"  # what `kata-runtime env` compares against
    put(layout.lib / "tools" / pin.name, lambda t: shutil.copyfile(pin, t))
    print(f"install: programs in {layout.lib}", file=out)
    put(layout.share / "vmlinux", lambda t: shutil.copyfile(kernel, t))
    put(layout.share / "initramfs.cpio.lz4",
        lambda t: shutil.copyfile(WORKSPACE / "guest" / "initramfs.cpio.lz4", t))
    print(f"install: guest kernel and initramfs in {layout.share}", file=out)
    for name, module in PROGRAMS.items():
        text = _LAUNCHER.format(python=sys.executable, lib=str(layout.lib), module=module,
                                server=str(layout.bin / "kata-vmcache-server"),
                                config=str(layout.etc / "configuration.toml"))
        put(layout.bin / name, lambda t, text=text: (t.write_text(text), t.chmod(0o755)))
    print(f"install: kata-runtime and kata-vmcache-server in {layout.bin}", file=out)
    config = layout.etc / "configuration.toml"
    config_sha = ""
    if config.exists():
        print(f"install: kept the existing {config}; the assets are in {layout.share}", file=out)
    else:
        put(config, lambda t: t.write_text(_configuration(layout)))
        config_sha = _sha256(config)
        print(f"install: configuration in {config}", file=out)
    layout.manifest.write_text(json.dumps({"files": files, "dirs": dirs, "configuration": str(config),
                                           "configuration_sha256": config_sha}, indent=1))


def uninstall(layout: Layout, out=sys.stdout) -> None:
    try:
        record = json.loads(layout.manifest.read_text())
    except FileNotFoundError:
        raise InstallError(f"nothing installed there ({layout.manifest} does not exist)") from None
    for name in record["files"]:
        path = Path(name)
        if name == record["configuration"] and path.exists() and _sha256(path) != record["configuration_sha256"]:
            print(f"uninstall: kept {path}: it was edited since install", file=out)
            continue
        path.unlink(missing_ok=True)
    layout.manifest.unlink()
    for name in sorted(record["dirs"], key=len, reverse=True):
        try:
            Path(name).rmdir()
        except OSError:
            pass  # not empty: something else lives there now
    print(f"uninstall: removed {len(record['files'])} files", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", default="/usr/local", help="where bin/, lib/ and share/ go (default /usr/local)")
    parser.add_argument("--sysconfdir", default="/etc", help="where kata-containers/configuration.toml goes")
    parser.add_argument("--uninstall", action="store_true", help="remove exactly what install put there")
    args = parser.parse_args(argv)
    cwd = os.environ.get("BUILD_WORKING_DIRECTORY", os.getcwd())
    layout = Layout(Path(cwd, args.prefix).resolve(), Path(cwd, args.sysconfdir).resolve())
    try:
        (uninstall if args.uninstall else install)(layout)
    except InstallError as err:
        print(f"install: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
