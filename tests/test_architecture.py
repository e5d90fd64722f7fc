"""The package's layout holds: imports run downwards through the floors, and nothing imports in a circle.

Read from the source (ast), so imports inside functions and under TYPE_CHECKING count too.
docs/ARCHITECTURE.md draws the floors.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT

PACKAGE = ROOT / "dist_share"

# Each room of the package and its floor. A module may import from lower floors and from its own
# room; rooms on one floor are independent of each other.
FLOORS = {
    "errors": 0,
    "files": 0,
    "config": 1,
    "launch": 1,
    "compat": 2,
    "data": 2,
    "model": 2,
    "families": 3,
    "distribute": 4,
    "train": 5,
    "retrieval": 5,
    "run": 6,
    "cli": 7,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["dist_share", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The package module an imported dotted name lives in (None outside the package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name if name.startswith("dist_share") else None


def _imports(module: str) -> set[str]:
    """Every package module ``module`` imports, at any depth of its code."""
    path = MODULES[module]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target and target != module:
                found.add(target)
    return found


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


GRAPH = {m: _imports(m) for m in MODULES if m != "dist_share"}


def test_every_room_has_a_floor() -> None:
    rooms = {_room(m) for m in GRAPH}
    assert rooms <= set(FLOORS), f"rooms without a floor: {sorted(rooms - set(FLOORS))}"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_run_downwards(module: str) -> None:
    here = _room(module)
    for target in sorted(GRAPH[module]):
        there = _room(target)
        if there == here:
            continue
        assert FLOORS[there] < FLOORS[here], (
            f"{module} (floor {FLOORS[here]}, {here}/) imports {target} "
            f"(floor {FLOORS[there]}, {there}/): imports must go to a lower floor"
        )


def test_no_import_circles() -> None:
    """Tarjan's strongly connected components over the whole import graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
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
                circles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_subpackage_inits_only_name_their_room() -> None:
    """A folder's ``__init__`` is its docstring: every import names the module that defines a
    thing, so each thing has one home (the public API is the top ``dist_share/__init__.py``)."""
    for module, path in MODULES.items():
        if path.name != "__init__.py" or module == "dist_share":
            continue
        tree = ast.parse(path.read_text())
        body = [
            n
            for n in tree.body
            if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
        ]
        assert not body, f"{path} holds code; keep it to a docstring"
        assert ast.get_docstring(tree), (
            f"{path} needs a one-line docstring saying what the folder owns"
        )


def test_the_launcher_side_never_loads_tensorflow() -> None:
    """``dist-share launch`` and the container entry point run where TensorFlow may be absent."""
    for module in GRAPH:
        if _room(module) != "launch":
            continue
        for node in ast.walk(ast.parse(MODULES[module].read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("tensorflow", "keras"), f"{module} imports {name}"


def test_the_public_api_names_real_things() -> None:
    import dist_share

    for name in dist_share.__all__:
        assert getattr(dist_share, name) is not None
