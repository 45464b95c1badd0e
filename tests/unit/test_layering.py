"""The layout's rules, read from the source (shared/DESIGN.md, docs/architecture.md).

Imports point down the layers: no two packages import each other, even through others or for
types only, and a runtime never imports a concrete strategy: it is typed against
`strategy/base.py`'s protocols.
"""

from __future__ import annotations

import ast
from pathlib import Path

import edgeddl

SRC = Path(edgeddl.__file__).parent
CONCRETE_STRATEGIES = (
    "edgeddl.strategy.data_parallel",
    "edgeddl.strategy.compressed",
    "edgeddl.strategy.federated",
    "edgeddl.strategy.robust_dp",
    "edgeddl.strategy.split.learning",
)


def _imports() -> dict[Path, set[str]]:
    """Every module's `from edgeddl... import` targets (inside functions and TYPE_CHECKING
    blocks too)."""
    out: dict[Path, set[str]] = {}
    for path in SRC.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("edgeddl."):
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("edgeddl."))
        out[path] = found
    return out


def _unit(path: Path) -> str:
    """A module's layer: its top-level package, or the module itself at the top level."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return parts[0]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph`, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_two_packages_import_each_other() -> None:
    graph: dict[str, set[str]] = {}
    for path, targets in _imports().items():
        src = _unit(path)
        for target in targets:
            dst = target.split(".")[1]
            if dst != src:
                graph.setdefault(src, set()).add(dst)
    assert "runtime" in graph and "strategy" in graph["runtime"]  # the graph is read
    assert _cycle(graph) is None, f"package import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_a_runtime_imports_no_concrete_strategy() -> None:
    reaching = {
        str(path.relative_to(SRC)): sorted(t for t in targets if t.startswith(CONCRETE_STRATEGIES))
        for path, targets in _imports().items()
        if _unit(path) in ("runtime", "cli", "report", "inference", "security")
    }
    assert "edgeddl.strategy.base" in _imports()[SRC / "runtime/sim/state.py"]  # read
    assert {k: v for k, v in reaching.items() if v} == {}


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None
