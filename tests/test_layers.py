"""Imports point down the layers of docs/architecture.md, and no lorax module imports itself back in a cycle.

Read with ``ast`` (nothing is imported): every ``import lorax.<layer>…`` in ``lorax/``, at module level or inside a
function. ``KNOWN_UPWARD`` lists the upward imports that remain today, file by file; the test fails on any new one,
and on a listed one that is gone (so the list only shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "lorax"

# Lower numbers sit lower; a module may import its own layer and any lower one. Shared modules sit at 0.
RANK = {
    "errors": 0, "progress": 0, "specs": 0, "dtypes": 0, "libraries": 0, "__init__": 0,
    "io": 1,
    "models": 2, "data": 2,
    "adapters": 3, "formats": 3,
    "training": 4, "gen": 4, "zoo": 4,
    "services": 5,
    "cli": 6, "__main__": 7,
}  # fmt: skip
# Layers of one rank that may import each other (LoraState and the formats that read it; training's pictures).
SIBLINGS = {
    frozenset({"adapters", "formats"}),
    frozenset({"training", "gen"}),  # training draws its loss plot and samples sheet with gen's grids
}
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _layer(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return parts[0]


def _imports(path: Path, *, module_level_only: bool = False, runtime_only: bool = False) -> list[str]:
    """The lorax modules ``path`` imports; ``runtime_only``: less those under ``if TYPE_CHECKING:`` (annotations
    only: Python never runs them)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    skipped: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped |= {id(n) for part in node.body for n in ast.walk(part)}
    found: list[str] = []
    for node in nodes:
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return [n for n in found if n.startswith("lorax.")]


def test_every_layer_has_a_rank() -> None:
    layers = {_layer(p) for p in ROOT.rglob("*.py")}
    assert layers <= set(RANK), (
        f"give these a rank (and a place in docs/architecture.md): {layers - set(RANK)}"
    )


def test_imports_point_down() -> None:
    upward: set[tuple[str, str]] = set()
    for path in sorted(ROOT.rglob("*.py")):
        src = _layer(path)
        for name in _imports(path):
            dst = name.split(".")[1]
            if dst not in RANK or dst == src or frozenset({src, dst}) in SIBLINGS:
                continue
            if (RANK[dst] >= RANK[src] and RANK[src] > 0) or (
                RANK[src] == 0 and RANK[dst] > 0 and _layer(path) != "__init__"
            ):
                upward.add((path.relative_to(ROOT).as_posix(), dst))
    assert upward - KNOWN_UPWARD == set(), "imports that point up the layers (docs/architecture.md)"
    assert KNOWN_UPWARD - upward == set(), "these upward imports are gone: remove them from KNOWN_UPWARD"


def test_io_reads_family_knowledge_as_data() -> None:
    """``io`` learns about families only through ``CheckpointLayout`` data (lorax.io.checkpoint_layouts)."""
    for path in sorted((ROOT / "io").rglob("*.py")):
        assert not any(n.startswith("lorax.models.families") for n in _imports(path)), path


def test_no_import_cycles_at_module_level() -> None:
    modules: dict[str, Path] = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    graph = {
        m: {n for n in _imports(p, module_level_only=True) if n in modules and n != m}
        for m, p in modules.items()
    }
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = [*path[path.index(n) :], n]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_import_cycles_anywhere() -> None:
    """No lorax module imports itself back, counting imports inside functions too (kohya once handed LyCORIS
    groups to ``lycoris``, which imported ``kohya``; ``data.concepts`` and ``data.kohya``, ``training.algos`` and
    ``training.lora``, ``training.config`` and its checks imported each other). An import of a parent package is
    no edge: Python imports the package before any of its modules; nor is one under ``if TYPE_CHECKING:``."""
    modules: dict[str, Path] = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {
        m: {
            n for n in _imports(p, runtime_only=True) if n in modules and n != m and not m.startswith(n + ".")
        }
        for m, p in modules.items()
    }

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for n in graph[start] - seen:
            seen.add(n)
            if n == goal or reaches(n, goal, seen):
                return True
        return False

    cycles = sorted(m for m in graph if reaches(m, m, set()))
    assert cycles == [], f"modules on an import cycle: {cycles}"
