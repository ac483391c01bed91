"""The Python runtime the guest agent needs: interpreter, shared libraries, and only the modules
the agent actually imports, as sourceless .pyc files.

The module set is measured, not guessed: the target interpreter imports the agent's entry module
in a subprocess (started like the guest starts it: -S -E -s, empty environment) and reports
sys.modules. Frozen and built-in modules need no file; everything else is packed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import py_compile
import re
import subprocess
import sys
import tempfile
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

from guest.initramfs.cpio import CpioArchive

GUEST_PYTHON = "usr/bin/python3"
GUEST_LIB_DIR = "lib/x86_64-linux-gnu"  # on the loader's built-in search path
# Python finds sys.prefix by looking for lib/pythonX.Y/os.py[c] above its executable.
GUEST_STDLIB_FMT = "usr/lib/python{version}"
GUEST_AGENT_DIR = "usr/lib/kata-agent"
GUEST_AGENT_LAUNCHER = GUEST_AGENT_DIR + "/kata_agent.pyc"

# Imported during interpreter start-up before any of our code runs, or by the encoding machinery
# on demand (encodings must exist as files in 3.11); cheap insurance that the guest's stdio never
# fails to find its codec.
ALWAYS_STDLIB_FILES = (
    "os.py",  # the sys.prefix landmark (the module itself is frozen into the interpreter)
    "encodings/__init__.py",
    "encodings/aliases.py",
    "encodings/utf_8.py",
    "encodings/ascii.py",
    "encodings/latin_1.py",
)
# optimize=2 drops docstrings and asserts: smaller files and less to unmarshal under TCG.
PYC_OPTIMIZE = 2

LAUNCHER_SOURCE = '''"""Launcher of the kata-vmfactory guest agent (its directory is sys.path[0])."""
from guest.agent import lazyimports

lazyimports.install()  # before the agent imports protobuf
from guest.agent.main import run

run()
'''

_PROBE = r"""
import json, sys
request = json.loads(sys.argv[1])
sys.path[0:0] = request["path"]
__import__(request["entry"])
exec(request["exercise"])
report = []
for name, module in sorted(sys.modules.items()):
    spec = getattr(module, "__spec__", None)
    report.append({
        "name": name,
        "origin": getattr(spec, "origin", None),
        "file": getattr(module, "__file__", None),
        "package": hasattr(module, "__path__"),
        "namespace_dirs": (list(getattr(module, "__path__", []) or [])
                           if spec is not None and spec.origin in (None, "namespace") else []),
    })
print(json.dumps({"modules": report, "version": list(sys.version_info[:2]), "stdlib": sys.prefix}))
"""


class PythonImageError(Exception):
    pass


class ProbedModule(NamedTuple):
    name: str
    origin: Optional[str]
    file: Optional[str]
    package: bool
    namespace_dirs: List[str]


# Where the distribution's interpreter lives. Debian builds it with PGO and LTO and libpython linked
# in; a default source build (pyenv's) is neither. Measured in the guest under TCG, same image
# otherwise: interpreter start 0.25 -> 0.15 s, importing the agent 0.90 -> 0.67 s, and every
# request the agent handles is interpreted faster too.
DISTRO_PYTHON_DIR = "/usr/bin"


def base_interpreter() -> str:
    """The distribution's interpreter of the running Python version if there is one, else the
    interpreter the running venv is built on."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for path in (os.path.join(DISTRO_PYTHON_DIR, f"python{version}"),
                 os.path.join(sys.base_prefix, "bin", f"python{version}")):
        if os.path.exists(path):
            return path
    raise PythonImageError(f"no python{version} in {DISTRO_PYTHON_DIR} or {sys.base_prefix}/bin; pass --python")


def site_dir_of(package: str) -> str:
    """The sys.path entry from which `package` (e.g. google.protobuf) is imported here."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PythonImageError(f"{package} is not importable by {sys.executable}; is the venv complete?")
    location = list(spec.submodule_search_locations)[0]
    for _ in package.split("."):
        location = os.path.dirname(location)
    return location


def probe_imports(
    python: str, path: List[str], entry: str, exercise: str, env: Optional[Dict[str, str]] = None
) -> Tuple[List[ProbedModule], str]:
    """The modules `python` has loaded after importing `entry` and running `exercise`."""
    request = json.dumps({"path": path, "entry": entry, "exercise": exercise})
    proc = subprocess.run(
        [python, "-S", "-E", "-s", "-B", "-c", _PROBE, request],
        capture_output=True, text=True, env=dict(env or {}), check=False,
    )
    if proc.returncode != 0:
        raise PythonImageError(
            f"importing {entry} with {python} failed (exit {proc.returncode}):\n{proc.stderr.strip()}"
        )
    report = json.loads(proc.stdout)
    if tuple(report["version"]) != sys.version_info[:2]:
        raise PythonImageError(
            f"{python} is Python {report['version']}, but this builder runs on "
            f"{sys.version_info[:2]} and compiles the .pyc files: run the builder with the same version"
        )
    return [ProbedModule(**m) for m in report["modules"]], report["stdlib"]


def compile_pyc(source: str, guest_path: str) -> bytes:
    """Sourceless .pyc bytes: hash-based and unchecked (no mtime in it, never revalidated)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pyc")
        py_compile.compile(
            source, cfile=out, dfile="/" + guest_path, doraise=True, optimize=PYC_OPTIMIZE,
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )
        with open(out, "rb") as f:
            return f.read()


def shared_libraries(elf_paths: Iterable[str]) -> Tuple[Dict[str, str], Optional[str]]:
    """(soname -> host path of every library ldd resolves, host path of the loader)."""
    libraries: Dict[str, str] = {}
    loader: Optional[str] = None
    for elf in elf_paths:
        proc = subprocess.run(["ldd", elf], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise PythonImageError(f"ldd {elf} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        for line in proc.stdout.splitlines():
            line = line.strip()
            match = re.match(r"(\S+) => (\S+) \(0x", line)
            if match:
                libraries[match.group(1)] = match.group(2)
            elif "not found" in line:
                raise PythonImageError(f"ldd {elf}: {line}")
            elif line.startswith("/") and "ld-linux" in line:
                loader = line.split()[0]
    return libraries, loader


def strip_elf(path: str, enabled: bool) -> bytes:
    """The ELF file's bytes without symbols or debug info not needed to run or link it."""
    if not enabled:
        with open(path, "rb") as f:
            return f.read()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "stripped")
        proc = subprocess.run(["strip", "--strip-unneeded", "-o", out, path], capture_output=True, text=True)
        if proc.returncode != 0:
            raise PythonImageError(f"strip {path} failed: {proc.stderr.strip()}; pass --no-strip to skip")
        with open(out, "rb") as f:
            return f.read()


class PythonImage:
    """Adds the interpreter, its libraries and the agent's import closure to an archive."""

    def __init__(self, archive: CpioArchive, python: str, strip: bool = True) -> None:
        self.archive = archive
        self.python = python
        self.strip = strip
        self.elves: List[str] = [python]  # ELF files whose libraries must come along
        self.counts: Dict[str, int] = {"stdlib": 0, "agent": 0, "extensions": 0, "libraries": 0}

    def add_agent(
        self,
        agent_tree: str,
        site_dirs: List[str],
        entry: str,
        exercise: str,
        exclude: Iterable[str] = (),
        env: Optional[Dict[str, str]] = None,
    ) -> None:
        """Pack everything `entry` imports from agent_tree, site_dirs and the stdlib."""
        excluded = tuple(exclude)
        modules, prefix = probe_imports(self.python, [agent_tree, *site_dirs], entry, exercise, env)
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        stdlib_host = os.path.join(prefix, "lib", f"python{version}")
        stdlib_guest = GUEST_STDLIB_FMT.format(version=version)
        # The agent's own path first: a site directory may lie inside the stdlib directory.
        roots = [(d, GUEST_AGENT_DIR, "agent") for d in [agent_tree, *site_dirs]]
        roots.append((stdlib_host, stdlib_guest, "stdlib"))

        def destination(host_file: str) -> Tuple[str, str]:
            for host_root, guest_root, kind in roots:
                rel = os.path.relpath(host_file, host_root)
                if not rel.startswith(".."):
                    return f"{guest_root}/{rel}", kind
            raise PythonImageError(f"imported file {host_file} is outside the stdlib and the agent's path")

        packed = set()
        for module in modules:
            if any(module.name == e or module.name.startswith(e + ".") for e in excluded):
                continue
            if module.name == "__main__" or module.origin in ("built-in", "frozen"):
                continue  # inside the interpreter; os is added below as a file anyway
            if module.namespace_dirs:
                for directory in module.namespace_dirs:
                    self.archive.add_dir(destination(directory)[0])
                continue
            if not module.file:
                continue  # made up at run time by a packed module (typing.io, typing.re)
            self._add_module_file(module.file, *destination(module.file))
            packed.add(os.path.realpath(module.file))
        for rel in ALWAYS_STDLIB_FILES:
            host_file = os.path.join(stdlib_host, rel)
            if os.path.realpath(host_file) not in packed:
                self._add_module_file(host_file, f"{stdlib_guest}/{rel}", "stdlib")
        # Python checks for this directory to set sys.exec_prefix, even when it is empty.
        self.archive.add_dir(f"{stdlib_guest}/lib-dynload")
        self.archive.add_file(GUEST_AGENT_LAUNCHER, _compile_text(LAUNCHER_SOURCE, GUEST_AGENT_LAUNCHER))

    def _add_module_file(self, host_file: str, guest_file: str, kind: str) -> None:
        if host_file.endswith(".py"):
            self.archive.add_file(guest_file[:-3] + ".pyc", compile_pyc(host_file, guest_file))
            self.counts[kind] += 1
        elif host_file.endswith(".so"):
            self.archive.add_file(guest_file, strip_elf(host_file, self.strip), 0o755)
            self.elves.append(host_file)
            self.counts["extensions"] += 1
        else:
            raise PythonImageError(f"{host_file} is neither a .py nor a .so module")

    def add_interpreter(self) -> None:
        self.archive.add_file(GUEST_PYTHON, strip_elf(self.python, self.strip), 0o755)
        libraries, loader = shared_libraries(self.elves)
        if loader is None:
            raise PythonImageError(f"ldd names no dynamic loader for {self.python}")
        for soname, host_path in sorted(libraries.items()):
            self.archive.add_file(f"{GUEST_LIB_DIR}/{soname}", strip_elf(host_path, self.strip), 0o755)
            self.counts["libraries"] += 1
        # The loader is found by the absolute path in each executable's PT_INTERP.
        self.archive.add_file(loader.lstrip("/"), strip_elf(loader, self.strip), 0o755)
        self.counts["libraries"] += 1


def _compile_text(source: str, guest_path: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "source.py")
        with open(path, "w") as f:
            f.write(source)
        return compile_pyc(path, guest_path[:-1])
