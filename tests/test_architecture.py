"""The house's import rules (docs/architecture.md §House), read from the code with ``ast``.

Every import counts, including ones inside functions: a lazy import still ties two modules
together. Run alone with ``.venv/bin/python -m pytest -q tests/test_architecture.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# spec_core's floors, lowest first; a module may import its own floor or lower ones.
FLOORS: list[tuple[str, ...]] = [
    (
        "spec_core.errors",
        "spec_core.config",
        "spec_core.contracts",
        "spec_core.utils",
        "spec_core.paths",
        "spec_core.assets",
        "spec_core.metrics",
    ),
    (
        "spec_core.data",
        "spec_core.transfer",
        "spec_core.engines",
        "spec_core.models",
        "spec_core.vocab",
        "spec_core.registry",
        "spec_core.families",
    ),
    (
        "spec_core.training",
        "spec_core.export",
        "spec_core.evaluate",
        "spec_core.dry_run",
        "spec_core.acceptance",
    ),
    ("spec_core.streaming",),
]
# Command-line entry points dispatch to every floor; they are imported by nothing of ours.
ENTRY_POINTS = ("spec_core.cli", "spec_core.data.__main__")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of our modules that ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph(packages: tuple[str, ...]) -> dict[str, set[str]]:
    files = [p for pkg in packages for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


def _floor(module: str) -> int | None:
    if module == "spec_core":  # the empty root package
        return 0
    if module in ENTRY_POINTS:
        return len(FLOORS)
    for level, prefixes in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _package_parents(module: str) -> set[str]:
    """A package's ``__init__`` importing its own submodules is not a circle of the design."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_circle():
    graph = _graph(("spec_core", "tasks", "flows"))
    pruned = {m: {d for d in deps if m not in _package_parents(d)} for m, deps in graph.items()}
    assert _cycles(pruned) == []


def test_every_spec_core_module_has_a_floor():
    graph = _graph(("spec_core",))
    assert [m for m in graph if _floor(m) is None] == []


def test_no_import_from_a_lower_floor_to_a_higher_one():
    graph = _graph(("spec_core",))
    upward = [
        f"{m} (floor {_floor(m)}) imports {d} (floor {_floor(d)})"
        for m, deps in sorted(graph.items())
        for d in sorted(deps)
        if (_floor(d) or 0) > (_floor(m) or 0)
    ]
    assert upward == []


def test_layers_point_down():
    """spec_core never imports Prefect, tasks or flows; tasks never import flows."""
    offenders = []
    for path in (ROOT / "spec_core").rglob("*.py"):
        for name in _imports(path):
            if name.split(".")[0] in ("prefect", "tasks", "flows"):
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
    for path in (ROOT / "tasks").rglob("*.py"):
        offenders += [f"{path.relative_to(ROOT)}: {n}" for n in _imports(path) if n == "flows"]
    assert offenders == []
