"""The package's shape: no import cycle anywhere (imports inside functions included), the arrows of DESIGN.md
(algorithms imports nothing of the project; actors, rewards and examples never import the orchestrator), a loop
that fits on a screen, and no module above 500 lines but the config schema."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("algorithms", "actors", "orchestrator", "rewards", "examples")


def modules() -> dict[str, Path]:
    """Dotted module name → file, for every module of the package folders (a package is its __init__)."""
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _executed(tree: ast.AST):
    """Every node that runs: all of them but the bodies of `if TYPE_CHECKING:` (imports for annotations only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            yield from (x for child in node.orelse for x in [child, *_executed(child)])
            continue
        yield node
        yield from _executed(node)


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports when it runs, at module level or inside a function."""
    found = set()
    for node in _executed(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import a.b.c` of a module: its nearest known prefix
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path a → ... → a, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_hidden_cycle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    source = REPO / "orchestrator" / "cli.py"
    assert "orchestrator.job" in imports_of(source, modules())  # an import inside a function counts
    typed = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import orchestrator.config\n")
    assert not [n for n in _executed(typed) if isinstance(n, ast.Import)]  # annotations only: never runs


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_imports_point_one_way():
    wrong = [f"{a} imports {b}" for a, targets in graph().items() for b in targets
             if (a.startswith("algorithms") and not b.startswith("algorithms"))
             or (a.startswith(("actors", "rewards", "examples")) and b.startswith("orchestrator"))]
    assert not wrong, "\n".join(wrong)


def test_the_loop_fits_on_a_screen_and_no_module_grows_past_500_lines():
    lines = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert lines["orchestrator.loop"] <= 150, lines["orchestrator.loop"]
    too_long = {name: n for name, n in lines.items() if n > 500 and name != "orchestrator.config"}
    assert not too_long, too_long
