"""The house keeps its shape: no runtime import cycle, each room imports only the rooms below it,
and no module reaches into another object's private members.

The rooms and what each may import are the README's module map (Development section); a change to
one is a change to the other.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edge_agent", "drivers")

# room -> the rooms it may import (type-only imports included). A room is a subpackage of
# edge_agent, a top-level module of edge_agent, or the drivers package.
ALLOWED: dict[str, set[str]] = {
    "edge_agent": set(),  # the package's face: its version
    "errors": set(),
    "pacing": set(),
    "tasks": set(),
    "config": {"errors"},
    "drivers": {"config", "errors"},
    "device": {"config", "drivers", "errors", "pacing"},
    "store": {"config", "drivers", "errors", "tasks"},
    "control": {"config", "drivers", "errors"},
    "cloud": {"config", "drivers", "errors", "pacing", "store"},
    "service": {"edge_agent", "config", "device", "errors", "store"},
    "remote": {"edge_agent", "config", "control", "errors", "pacing", "service", "store"},
    "agent": {"cloud", "config", "control", "device", "drivers", "errors", "remote", "service", "store", "tasks"},
    "demo": {"agent", "config", "errors", "store"},
    "commission": {"config", "drivers", "errors"},
    "cli": {"edge_agent", "agent", "commission", "config", "demo", "errors", "remote", "service", "store"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def room(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "drivers":
        return "drivers"
    return parts[1] if len(parts) > 1 else "edge_agent"


def imports(path: Path, known: dict[str, Path], *, runtime_only: bool) -> Iterator[tuple[str, int]]:
    """(imported project module, line) for every import in ``path``; ``runtime_only`` skips the
    ``if TYPE_CHECKING:`` blocks (imports inside functions run too, so they count)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # "edge_agent.config.AgentConfig" -> "edge_agent.config"
                name = name.rpartition(".")[0]
            if name:
                yield name, node.lineno


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), as sorted lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_runtime_import_cycle() -> None:
    known = modules()
    graph = {name: {target for target, _ in imports(path, known, runtime_only=True)
                    # a package's __init__ is imported with any of its modules; not an edge back
                    if target != name and not name.startswith(target + ".")}
             for name, path in known.items()}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_each_room_imports_only_the_rooms_the_module_map_allows() -> None:
    known = modules()
    assert {room(name) for name in known} == set(ALLOWED), "a room was added or removed: update ALLOWED and the README"
    offences = []
    for name, path in known.items():
        for target, line in imports(path, known, runtime_only=False):
            if room(target) != room(name) and room(target) not in ALLOWED[room(name)]:
                offences.append(f"{path.relative_to(ROOT)}:{line}: {room(name)} imports {target}")
    assert offences == []


def test_the_module_map_in_the_readme_names_every_room() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Development"):]
    for name in ALLOWED:
        shown = {"edge_agent": "edge_agent/__init__.py", "drivers": "drivers/"}.get(name)
        if shown is None:
            shown = f"edge_agent/{name}/" if (ROOT / "edge_agent" / name).is_dir() else f"edge_agent/{name}.py"
        assert f"`{shown}`" in section, f"the README's module map lacks {shown}"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_touches_another_objects_private_members(package: str) -> None:
    offences = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and ast.unparse(node.value) not in ("self", "cls")):
                offences.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert offences == []
