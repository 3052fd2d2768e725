"""The layout is the architecture: no import cycle among tuner's modules (function-level imports
included), no module over 500 lines, no private name imported across modules, and the README's
Layout table lists exactly the modules there are."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tuner"


def _import_nodes(path: Path) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, function-level ones included."""
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]


def _imports() -> dict[str, set[tuple[str, str]]]:
    """module -> {(imported tuner module, imported name or '')} from every import statement."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    found: dict[str, set[tuple[str, str]]] = {m: set() for m in modules}
    for path in PACKAGE.glob("*.py"):
        for node in _import_nodes(path):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tuner":
                parts = node.module.split(".")
                if len(parts) > 1:
                    found[path.stem] |= {(parts[1], a.name) for a in node.names}
                else:  # from tuner import x
                    found[path.stem] |= {(a.name, "") for a in node.names if a.name in modules}
            elif isinstance(node, ast.Import):
                found[path.stem] |= {(a.name.split(".")[1], "") for a in node.names if a.name.startswith("tuner.")}
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_module_graph_has_no_cycle() -> None:
    imports = _imports()
    graph = {m: {target for target, _ in names if target in imports and target != m} for m, names in imports.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_over_500_lines() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 500} == {}


def test_no_private_name_is_imported_across_modules() -> None:
    private = sorted(f"{m} imports {target}.{name}" for m, names in _imports().items() for target, name in names if name.startswith("_"))
    assert private == []


def test_readme_layout_table_lists_the_modules() -> None:
    text = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"`tuner/([a-z_]+)\.py`", text))
    actual = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert listed == actual, f"README lacks {sorted(actual - listed)}, lists missing {sorted(listed - actual)}"


def _third_party(module: str) -> set[str]:
    """The top-level packages a tuner module imports (function-level imports included)."""
    tops: set[str] = set()
    for node in _import_nodes(PACKAGE / f"{module}.py"):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            tops.add(node.module.split(".")[0])
    return tops - {"tuner"}


def test_mlflow_is_imported_only_at_the_tracking_boundary() -> None:
    """tracking.py (runs, metrics, artifacts), registry.py (the model registry half of it, split off
    at 500 lines) and pyfunc_model.py (the models-from-code file MLflow itself loads)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert {m for m in modules if "mlflow" in _third_party(m)} == {"tracking", "registry", "pyfunc_model"}


def test_the_training_function_and_everything_it_imports_know_neither_optuna_nor_mlflow() -> None:
    """train() is shared by every path (sequential, fused, refit, replay): it and the tuner modules
    it reaches, transitively, import torch, never optuna or mlflow."""
    imports = _imports()
    graph = {m: {target for target, _ in names if target in imports} for m, names in imports.items()}
    reached: set[str] = set()
    todo = ["train", "fused"]
    while todo:
        m = todo.pop()
        if m not in reached:
            reached.add(m)
            todo += sorted(graph[m])
    assert {"train", "fused", "bank", "model", "data", "optim"} <= reached
    leaking = {m: sorted(_third_party(m) & {"optuna", "mlflow"}) for m in reached}
    assert {m: found for m, found in leaking.items() if found} == {}
