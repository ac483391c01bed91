"""The import graph of the tree: layers import downwards only, and no module cycles.

protocols, native, hostos  <-  factory  <-  configuration  <-  vmcache, runtime (peers: never each other)
guest/ runs inside the VM and may use only the wire formats. Bazel `visibility` enforces the same
between targets; this test also catches an import that slips past the targets (a module reached
through another target's runfiles).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What each top-level package may import from the project (besides itself).
ALLOWED: dict[str, set[str]] = {
    "protocols": set(),
    "native": set(),
    "hostos": set(),
    "guest": {"protocols"},
    "factory": {"protocols", "native", "hostos"},
    "configuration": {"factory", "hostos"},
    "vmcache": {"configuration", "factory", "native", "protocols", "hostos"},
    "runtime": {"configuration", "factory", "native", "protocols", "hostos"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(path: Path, name: str) -> set[str]:
    """Project modules imported at module level or inside functions (a lazy import is still a dependency)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {imp for imp in _imports(path, name) if imp in modules and imp != name}
            for name, path in modules.items()}


def test_every_layer_imports_only_the_layers_below_it():
    wrong = []
    for module, targets in _graph().items():
        layer = module.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != layer and other not in ALLOWED[layer]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "upward or sideways imports:\n" + "\n".join(sorted(wrong))


def test_no_module_import_cycles():
    graph = _graph()
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    # A package importing its own submodules (its __init__) is not a cycle worth refusing.
    cycles = [c for c in cycles if not all(part.startswith(c.split(" -> ")[0]) for part in c.split(" -> "))]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_every_layer_has_modules(layer):
    # A renamed folder must not make the checks above vacuous.
    assert any(name.split(".")[0] == layer for name in _modules())


def test_the_factory_config_is_below_the_driver_and_strategies():
    # factory.config is what every other factory module is configured with: it imports none of them.
    base = {"factory", "factory.errors", "factory.assets", "factory.config"}
    graph = _graph()
    wrong = [f"{m} imports {t}" for m in base for t in graph[m] if t.startswith("factory") and t not in base]
    assert not wrong, "\n".join(wrong)
