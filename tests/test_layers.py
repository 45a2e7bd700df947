"""The layout's rules, checked on the source with ast (nothing is imported):

- every import of an arcfold module (module-level, function-local, under TYPE_CHECKING, relative, and
  importlib.import_module / __import__ with a literal name) goes to the importer's layer or below;
- no import cycle between arcfold modules, not even within a layer;
- every module has a layer, at most MAX_TOP_LEVEL modules sit at the top of the package, no file is longer
  than MAX_LINES;
- no test reaches into a private (single-underscore) name of arcfold.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "arcfold"
TESTS = ROOT / "tests"

# Package or top-level module -> its layer. A module imports only from layers <= its own. The package itself
# (arcfold/__init__.py) runs before any of its modules, so it is the bottom layer.
LAYER = {
    "__init__": 0,
    "config": 0,
    "data": 1,
    "checks": 2,
    "engine": 2,
    "run": 3,
    "orchestrate": 4,
    "report": 4,
    "pipeline": 5,
    "pretrain": 5,
    "track": 6,
    "cli": 7,
    "__main__": 8,
}
MAX_TOP_LEVEL = 5  # top-level modules in src/arcfold besides __init__ and __main__
MAX_LINES = 400


# ---------------------------------------------------------------------------------------------------------------
# Reading the imports


def module_name(path: Path, src: Path = SRC) -> str:
    """arcfold/engine/model.py -> arcfold.engine.model; arcfold/data/__init__.py -> arcfold.data."""
    parts = [src.name, *path.relative_to(src).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules(src: Path = SRC) -> dict[str, Path]:
    return {module_name(p, src): p for p in sorted(src.rglob("*.py"))}


def resolve(name: str, modules: set[str]) -> str | None:
    """The arcfold module a dotted name imports: its longest prefix that is a module (None: not arcfold's)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def absolute(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """The absolute name of `from {'.' * level}{module} import ...` written in `importer`."""
    if level == 0:
        return module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, module] if module else base)


def literal_import(node: ast.Call) -> str | None:
    """The module named by importlib.import_module("...") / import_module("...") / __import__("...")."""
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if called not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def imports_in(source: str, importer: str, modules: set[str], is_package: bool = False) -> list[tuple[int, str]]:
    """(line, arcfold module) for every import in the source, wherever it is written."""
    found: list[tuple[int, str | None]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, resolve(alias.name, modules)) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node.module, node.level, importer, is_package)
            for alias in node.names:  # `from arcfold import pipeline` imports the module arcfold.pipeline
                found.append((node.lineno, resolve(f"{base}.{alias.name}", modules) or resolve(base, modules)))
        elif isinstance(node, ast.Call) and (name := literal_import(node)):
            found.append((node.lineno, resolve(name, modules)))
    return sorted((line, target) for line, target in found if target is not None and target != importer)


def import_graph(src: Path = SRC) -> dict[str, list[tuple[int, str]]]:
    """arcfold module -> (line, arcfold module) of each import it makes."""
    modules = source_modules(src)
    names = set(modules)
    return {
        name: imports_in(path.read_text(), name, names, is_package=path.name == "__init__.py")
        for name, path in modules.items()
    }


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return LAYER.get(parts[1] if len(parts) > 1 else "__init__")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path a -> ... -> a) per strongly connected component that has one (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [cycle_through(graph, component) for component in components]


def cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle from the component's first member back to itself, staying inside the component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for succ in sorted(graph.get(node, ())):
                if succ == start:
                    return [*paths[node], start]
                if succ in component and succ not in paths:
                    paths[succ] = [*paths[node], succ]
                    nxt.append(succ)
        frontier = nxt
    raise AssertionError(f"no cycle in {component}")


def upward_imports(graph: dict[str, list[tuple[int, str]]]) -> list[str]:
    found = []
    for module, edges in sorted(graph.items()):
        own = layer_of(module)
        for line, target in edges:
            if own is not None and (layer_of(target) or 0) > own:
                found.append(f"{module}:{line} (layer {own}) imports {target} (layer {layer_of(target)})")
    return found


GRAPH = import_graph()


# ---------------------------------------------------------------------------------------------------------------
# The rules on src/arcfold


def test_every_module_has_a_layer():
    missing = [module for module in GRAPH if layer_of(module) is None]
    assert not missing, f"modules without a layer in LAYER: {missing}"


def test_imports_go_only_downward():
    upward = upward_imports(GRAPH)
    assert not upward, "upward imports:\n  " + "\n  ".join(upward)


def test_no_import_cycles():
    cycles = find_cycles({module: {target for _, target in edges} for module, edges in GRAPH.items()})
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(cycle) for cycle in cycles)


def test_few_top_level_modules():
    top = sorted(p.stem for p in SRC.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert len(top) <= MAX_TOP_LEVEL, f"{len(top)} top-level modules (at most {MAX_TOP_LEVEL}): {top}"


def test_no_long_source_files():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"source files over {MAX_LINES} lines: {long}"


# ---------------------------------------------------------------------------------------------------------------
# The checker itself: it finds what it is meant to find


def test_find_cycles_finds_a_cycle_and_its_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"a"}}
    assert sorted(find_cycles(graph)) == [["a", "b", "c", "a"], ["e", "e"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_a_cycle_and_an_upward_import_in_a_tree_are_found(tmp_path):
    """A scratch package: a function-local upward import, a relative-import cycle, a literal import_module."""
    src = tmp_path / "arcfold"
    files = {
        "__init__.py": "",
        "config.py": "def later():\n    from arcfold import pipeline\n",
        "pipeline.py": "import importlib\nX = importlib.import_module('arcfold.data.tasks')\n",
        "data/__init__.py": "from .tasks import Task\n",
        "data/tasks.py": "from arcfold.data import folds\nclass Task: ...\n",
        "data/folds.py": "def f():\n    from . import tasks\n",
    }
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    graph = import_graph(src)
    assert graph["arcfold.config"] == [(2, "arcfold.pipeline")]
    assert graph["arcfold.pipeline"] == [(2, "arcfold.data.tasks")]
    assert graph["arcfold.data"] == [(1, "arcfold.data.tasks")]
    assert upward_imports(graph) == ["arcfold.config:2 (layer 0) imports arcfold.pipeline (layer 5)"]
    cycles = find_cycles({module: {target for _, target in edges} for module, edges in graph.items()})
    assert cycles == [["arcfold.data.folds", "arcfold.data.tasks", "arcfold.data.folds"]]


# ---------------------------------------------------------------------------------------------------------------
# Tests use arcfold's public names only


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def root_name(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def private_uses(source: str) -> list[str]:
    """Private arcfold names a test touches: `from arcfold... import _x`, `X._x` / `X.y._x` where X is bound by
    an arcfold import, setattr/getattr/hasattr(X, "_x") and "arcfold...._x" strings (monkeypatch targets)."""
    tree = ast.parse(source)
    bound: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "arcfold":
                    bound.add(alias.asname or "arcfold")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "arcfold":
            for alias in node.names:
                bound.add(alias.asname or alias.name)
                if is_private(alias.name):
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr) and root_name(node.value) in bound:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif (
            isinstance(node, ast.Call)
            and len(node.args) >= 2
            and root_name(node.args[0]) in bound
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and is_private(node.args[1].value)
        ):
            found.append(
                f"{node.lineno}: {ast.unparse(node.func)}({ast.unparse(node.args[0])}, {node.args[1].value!r})"
            )
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and re.fullmatch(r"arcfold(\.\w+)*\._(?!_)\w*", node.value)
        ):
            found.append(f"{node.lineno}: {node.value!r}")
    return sorted(set(found), key=lambda s: int(s.split(":")[0]))


def test_tests_touch_no_private_arcfold_name():
    found = {
        str(path.relative_to(ROOT)): uses
        for path in sorted(TESTS.rglob("*.py"))
        if (uses := private_uses(path.read_text()))
    }
    assert not found, "tests touching private arcfold names:\n" + "\n".join(
        f"  {path}:{use}" for path, uses in found.items() for use in uses
    )


def test_private_uses_finds_them():
    source = """
import arcfold.engine.model as model_module
from arcfold import pipeline
from arcfold.data import _helper, Task
import numpy as np

def test(monkeypatch, accelerator):
    pipeline._split(1)
    model_module.loader._cache.clear()
    Task._from_json({})
    monkeypatch.setattr(pipeline, "_step", None)
    monkeypatch.setattr("arcfold.run.worker._train", None)
    np._private, accelerator._optimizers, pipeline.__name__, pipeline.run  # not arcfold's, or not private
"""
    assert private_uses(source) == [
        "4: from arcfold.data import _helper",
        "8: pipeline._split",
        "9: model_module.loader._cache",
        "10: Task._from_json",
        "11: monkeypatch.setattr(pipeline, '_step')",
        "12: 'arcfold.run.worker._train'",
    ]
