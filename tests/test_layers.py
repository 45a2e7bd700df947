"""Each layer imports only downward: data -> engine -> pipeline -> entry points (checked on the source)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "arcfold"
# Module (file stem or package) -> its layer. config holds plain dataclass schemas any layer may use.
LAYER = {
    "data": 0,
    "config": 0,
    "engine": 1,
    "pipeline": 2,
    "results": 2,
    "budget": 2,
    "checkpoint": 2,
    "failures": 2,
    "worker": 2,
    "execute": 2,
    "execute_ray": 2,
    "report": 2,
    "progress": 2,
    "pretrain": 2,
    "__main__": 3,
    "tracking": 3,
    "score": 3,
    "compare": 3,
}


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return LAYER.get(parts[1]) if len(parts) > 1 and parts[0] == "arcfold" else None


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return found


FILES = sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_only_downward(path):
    rel = path.relative_to(SRC)
    own = LAYER[rel.parts[0] if len(rel.parts) > 1 else rel.stem]
    upward = [m for m in imports(path) if (layer_of(m) or 0) > own]
    assert not upward, f"{rel} (layer {own}) imports {upward}"


def test_every_module_has_a_layer():
    for path in FILES:
        rel = path.relative_to(SRC)
        assert (rel.parts[0] if len(rel.parts) > 1 else rel.stem) in LAYER, rel
