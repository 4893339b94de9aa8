"""The package's import graph: no cycle among edm_jax modules, and the sampling side
(edm_jax.api, edm_jax.load's checkpoint reader) reaches no training module.

The graph is read from the source (ast), not by importing: an edge A -> B for every import
statement of A naming module B (or a name defined in B), relative imports resolved; imports
of A's own parent packages are left out (a package is always initialised before its modules).
"""

import ast
from pathlib import Path

from train_testlib import ROOT

PACKAGE = ROOT / "edm_jax"


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of edm_jax (packages by their __init__.py)."""
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _imported(node: ast.AST, package: str, mods: dict[str, Path]) -> list[str]:
    """Names an import statement imports ('from X import a': X.a if a module, else X)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]


def _graph(mods: dict[str, Path], deferred: bool) -> dict[str, set[str]]:
    """Module -> edm_jax modules it imports (deferred: also imports inside functions)."""
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree) if deferred else tree.body:
            for target in _imported(node, package, mods):
                while target and target not in mods:  # edm_jax.x.y.z -> its module
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    edges.add(target)
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w) :] + [w]
            if w not in state and (found := visit(w)):
                return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo.extend(graph[v])
    return seen


def test_graph_reader_sees_known_edges():
    """The reader finds module-level and deferred imports as they are written."""
    mods = _modules()
    assert len(mods) > 80 and "edm_jax.nets.spec" in mods and "edm_jax" in mods
    top, every = _graph(mods, deferred=False), _graph(mods, deferred=True)
    assert "edm_jax.nets.spec" in top["edm_jax.train.loop"]  # from edm_jax.nets.spec import ...
    assert "edm_jax.samplers" in top["edm_jax.api"]  # from edm_jax.samplers import SAMPLER_INFO
    assert "edm_jax.guidance" in top["edm_jax.api"]  # from edm_jax import guidance
    assert "edm_jax.checkpoint_reader" not in top["edm_jax.api"]  # imported inside load()
    assert "edm_jax.checkpoint_reader" in every["edm_jax.api"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_edm_jax():
    """No cycle among module-level imports, nor once imports inside functions are counted."""
    mods = _modules()
    for deferred in (False, True):
        cycle = _cycle(_graph(mods, deferred))
        kind = "imports (deferred included)" if deferred else "module-level imports"
        assert cycle is None, f"import cycle in {kind}: {' -> '.join(cycle or [])}"


def test_sampling_side_reaches_no_training_module():
    """edm_jax.api and the checkpoint reader (edm_jax.load) import nothing of edm_jax.train,
    even through imports inside functions (old checkpoints are rebuilt by edm_jax.nets.spec)."""
    graph = _graph(_modules(), deferred=True)
    for start in ("edm_jax.api", "edm_jax.checkpoint_reader"):
        train = sorted(m for m in _reachable(graph, start) if m.startswith("edm_jax.train"))
        assert train == [], f"{start} reaches {train}"
