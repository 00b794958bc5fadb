"""Imports point down: checkpoints never import models, and no models module imports
another in a circle, lazy imports inside functions included."""

import ast
from pathlib import Path

import tformer

SRC = Path(tformer.__file__).parent


def imports_of(path: Path) -> set[str]:
    """Every tformer module a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tformer")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tformer"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # submodules by name
    return found


def modules(package: str) -> dict[str, set[str]]:
    return {
        f"tformer.{package}.{path.stem}": imports_of(path)
        for path in (SRC / package).glob("*.py")
        if path.stem != "__init__"
    }


def test_checkpoints_import_no_model_and_nn_nothing_above_it():
    for name, imported in modules("checkpoints").items():
        assert not any(i.startswith("tformer.models") for i in imported), name
    for name in ("sublayer", "packed_linear", "seeding"):
        imported = imports_of(SRC / "nn" / f"{name}.py")
        above = ("tformer.models", "tformer.checkpoints", "tformer.generate", "tformer.train")
        assert not any(i.startswith(above) for i in imported), name


def test_no_import_cycle_among_the_models():
    graph = modules("models")
    edges = {name: {i for i in imported if i in graph} for name, imported in graph.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges[start]:
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = [name for name in edges if reaches(name, name, {name})]
    assert not cycles


def test_models_do_not_import_generation():
    for name, imported in modules("models").items():
        assert not any(i.startswith("tformer.generate") for i in imported), name
