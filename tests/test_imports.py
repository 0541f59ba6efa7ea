"""The package's import graph: no cycles, and imports at the top of each module.

A cycle means something lives in the wrong module; an import inside a
function hides one. Only optional dependencies that a user may not have
installed are imported where they are used.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import herbarium

PACKAGE = Path(herbarium.__file__).parent
# Imported inside the function that needs them: optional extras (pip install 'herbarium-taxa[onnx]', ...).
OPTIONAL = {"onnx", "onnxruntime", "pretrainedmodels"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module name of a (possibly relative) ``from ... import``."""
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imported_modules(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The herbarium modules an import statement loads: the named ones, submodules imported by name, their packages.

    The module's own packages are left out: Python has them loaded (or loading) before the module runs.
    """
    if isinstance(node, ast.Import):
        targets = {alias.name for alias in node.names}
    else:
        base = absolute(module, node)
        targets = {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    loaded = set()
    for target in targets:
        parts = target.split(".")
        loaded |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    parts = module.split(".")
    own_packages = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}  # loaded before the module itself
    return {name for name in loaded if name in MODULES and name not in own_packages}


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported (not inside a function, not under ``if TYPE_CHECKING``)."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def function_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """``(line, top-level package)`` of every import inside a function body."""
    found = []
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    found.append((node.lineno, "herbarium" if node.level else (node.module or "").split(".")[0]))
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[module] = set().union(*(imported_modules(module, node) for node in module_level_imports(tree)))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that returns to its start, or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for neighbour in sorted(graph[node]):
            if state.get(neighbour) == "open":
                return path[path.index(neighbour):] + [neighbour]
            if neighbour not in state and (cycle := visit(neighbour)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_relative_and_submodule_imports_resolve_to_the_modules_they_load():
    tree = ast.parse("from .config import ModelConfig\nfrom herbarium.data import splits\nimport herbarium.runtime")
    nodes = module_level_imports(tree)
    assert imported_modules("herbarium.models.heads", nodes[0]) == {"herbarium.models.config"}
    assert "herbarium.data.splits" in imported_modules("herbarium.engine", nodes[1])
    assert "herbarium.runtime" in imported_modules("herbarium.engine", nodes[2])


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and "herbarium.engine" in graph["herbarium.train_cli"] | graph["herbarium.kfold"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_are_at_the_top_of_the_module(module):
    tree = ast.parse(MODULES[module].read_text())
    inside = [(line, name) for line, name in function_level_imports(tree) if name not in OPTIONAL]
    assert not inside, f"{MODULES[module]}: imports inside functions at lines {inside}; import at the top"
