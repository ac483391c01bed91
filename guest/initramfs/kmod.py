"""Kernel modules for the guest, with dependencies resolved from each .ko's .modinfo section.

Debian's kernel package ships no modules.dep (depmod runs at install time), so the `depends=`
entries of .modinfo are the source of truth; names listed in modules.builtin are compiled into
the kernel and need no file.
"""

from __future__ import annotations

import lzma
import os
import struct
from typing import Dict, Iterable, List, NamedTuple, Set


class KernelModuleError(Exception):
    pass


class KernelModule(NamedTuple):
    name: str  # canonical: '-' written as '_', as the kernel does
    path: str
    depends: List[str]


def canonical(name: str) -> str:
    return name.replace("-", "_")


def _module_name_from_file(filename: str) -> str:
    for suffix in (".ko", ".ko.xz"):
        if filename.endswith(suffix):
            return canonical(filename[: -len(suffix)])
    raise KernelModuleError(f"{filename} is not a kernel module file (.ko or .ko.xz)")


def read_module_bytes(path: str) -> bytes:
    """The uncompressed ELF object (busybox insmod wants it plain)."""
    with open(path, "rb") as f:
        data = f.read()
    return lzma.decompress(data) if path.endswith(".xz") else data


def modinfo(elf: bytes, source: str) -> Dict[str, List[str]]:
    """key -> values of the .modinfo section of an x86-64 relocatable ELF object."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise KernelModuleError(f"{source} is not a 64-bit little-endian ELF object")
    (e_shoff,) = struct.unpack_from("<Q", elf, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(index: int):
        # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size
        return struct.unpack_from("<IIQQQQ", elf, e_shoff + index * e_shentsize)

    strtab = section(e_shstrndx)
    names = elf[strtab[4] : strtab[4] + strtab[5]]
    for index in range(e_shnum):
        sh_name, _type, _flags, _addr, offset, size = section(index)
        name = names[sh_name : names.index(b"\0", sh_name)]
        if name == b".modinfo":
            info: Dict[str, List[str]] = {}
            for item in elf[offset : offset + size].split(b"\0"):
                key, sep, value = item.partition(b"=")
                if sep:
                    info.setdefault(key.decode(), []).append(value.decode("utf-8", "replace"))
            return info
    raise KernelModuleError(f"{source} has no .modinfo section")


class ModuleTree:
    """The modules of one kernel: /lib/modules/<release> of the unpacked package."""

    def __init__(self, modules_dir: str) -> None:
        if not os.path.isdir(modules_dir):
            raise KernelModuleError(f"modules directory {modules_dir} does not exist; run tools/guest_kernel.py")
        self.modules_dir = modules_dir
        self._files: Dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(modules_dir):
            dirnames.sort()
            for filename in sorted(filenames):
                if filename.endswith((".ko", ".ko.xz")):
                    self._files.setdefault(_module_name_from_file(filename), os.path.join(dirpath, filename))
        self.builtin = self._read_builtin()

    def _read_builtin(self) -> Set[str]:
        path = os.path.join(self.modules_dir, "modules.builtin")
        try:
            with open(path) as f:
                return {_module_name_from_file(os.path.basename(line.strip())) for line in f if line.strip()}
        except FileNotFoundError:
            return set()

    def module(self, name: str) -> KernelModule:
        name = canonical(name)
        path = self._files.get(name)
        if path is None:
            raise KernelModuleError(
                f"kernel module {name!r} not found under {self.modules_dir} (and not built in); "
                "check the name against the kernel's config"
            )
        info = modinfo(read_module_bytes(path), path)
        depends = [canonical(d) for value in info.get("depends", []) for d in value.split(",") if d]
        return KernelModule(name, path, depends)

    def load_order(self, wanted: Iterable[str]) -> List[KernelModule]:
        """`wanted` and everything they depend on, each after its dependencies; built-ins left out."""
        order: List[KernelModule] = []
        done: Set[str] = set()
        visiting: List[str] = []

        def visit(name: str) -> None:
            name = canonical(name)
            if name in done or name in self.builtin:
                return
            if name in visiting:
                cycle = " -> ".join(visiting[visiting.index(name) :] + [name])
                raise KernelModuleError(f"module dependency cycle: {cycle}")
            visiting.append(name)
            module = self.module(name)
            for dependency in module.depends:
                visit(dependency)
            visiting.pop()
            done.add(name)
            order.append(module)

        for name in wanted:
            visit(name)
        return order
