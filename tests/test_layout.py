"""The floors of jformer (docs/design.md): no import cycle, no import from a lower floor to a
higher one, the data package apart from the model, and no library module past ~450 lines."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "jformer"

FLOORS = {
    "config": 1, "masks": 1, "layers": 1, "positional": 1, "cache": 1, "flash": 1,
    "attention": 2, "blocks": 3, "recurrent": 3, "models": 4,
    "optim": 5, "training": 5, "ensemble": 5, "decoding": 5, "interop": 5,
    "parallel": 6, "checkpoint": 6, "integrity": 1,
    "equivariant": 5,  # SE(3)-Transformer, EGNN; its set-Transformer baseline runs models' encoder
    "data": 0,  # apart: imports nothing from the model floors
}
MAX_LINES = 460


def _imports(path: pathlib.Path) -> set[str]:
    """The jformer modules (first component) that a file imports."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "jformer":
                out.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "jformer" and len(parts) > 1:
                    out.add(parts[1])
    return out


def _graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        if path == root / "__init__.py":
            continue
        name = path.relative_to(root).with_suffix("").parts[0]
        graph.setdefault(name, set()).update(_imports(path) - {name})
    return graph


def test_every_module_has_a_floor():
    assert set(_graph()) == set(FLOORS), "a new module needs a floor in FLOORS and docs/design.md"


def _against_floors(graph):
    return [(a, b) for a, deps in graph.items() for b in deps
            if FLOORS[b] > FLOORS[a] or (FLOORS[a] == 0) != (FLOORS[b] == 0)]


def _cycle(graph) -> list[str] | None:
    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return None
        if state.get(node) == "open":
            return trail + [node]
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if found := visit(dep, trail + [node]):
                return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if found := visit(node, []):
            return found
    return None


def test_no_import_from_a_higher_floor():
    upward = _against_floors(_graph())
    assert not upward, f"imports against the floors (importer, imported): {upward}"


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_modules_stay_small():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by idea): {long}"


def test_the_checks_can_fail(tmp_path):
    """A planted upward import and a planted cycle are caught."""
    (tmp_path / "layers.py").write_text("from jformer import models\n")
    (tmp_path / "models.py").write_text("import jformer.layers\n")
    graph = _graph(tmp_path)
    assert graph == {"layers": {"models"}, "models": {"layers"}}
    assert _against_floors(graph) == [("layers", "models")]
    assert _cycle(graph) == ["layers", "models", "layers"]
