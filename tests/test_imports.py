"""The package's import graph (read with ast, nothing imported): no module imports one that
imports it, directly or through others, and only the command line imports the mode dispatcher."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "simclr_jax"


def module_name(path: pathlib.Path) -> str:
    """simclr_jax/data/common.py -> simclr_jax.data.common; a package's __init__ -> its name."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (late imports included)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # 'from pkg import mod' names the module pkg.mod when there is one.
                targets = [
                    f"{node.module}.{alias.name}"
                    if f"{node.module}.{alias.name}" in modules
                    else node.module
                    for alias in node.names
                ]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read():
    graph = import_graph()
    assert "simclr_jax.training" in graph["simclr_jax.train"]
    assert "simclr_jax.step" in graph["simclr_jax.distill"]


def test_package_imports_have_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_nothing_imports_upward_into_the_entry_points():
    graph = import_graph()
    importers = {name for name, targets in graph.items() if "simclr_jax.train" in targets}
    # The command lines that build a run: main trains it, preflight compiles it for a TPU.
    assert importers == {"simclr_jax.main", "simclr_jax.preflight.core"}
    assert not any("simclr_jax.main" in targets for targets in graph.values())
    # The preflight package is imported only from inside itself.
    for name, targets in graph.items():
        if not name.startswith("simclr_jax.preflight"):
            assert not any(t.startswith("simclr_jax.preflight") for t in targets), name
