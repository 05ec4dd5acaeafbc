"""The layers of docs/architecture.md, enforced: a lower layer never imports a higher one.

Every ``import`` statement of every module under ``mf_dist`` counts, those
inside functions too (a lazy import is still a dependency), except those
under ``if TYPE_CHECKING:``, which only name types for annotations.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.paths import REPO

PACKAGE = REPO / "mf_dist"

# Lowest first; a module may import its own layer and those below it.
LAYERS: dict[str, int] = {
    "mf_dist.errors": 0,
    "mf_dist.settings": 0,
    # The catalogue of models: it names each trainer as "module:Class" and
    # imports it on use, so it sits at the bottom with the settings it fills in.
    "mf_dist.registry": 0,
    "mf_dist.blocks": 1,
    "mf_dist.models": 1,
    "mf_dist.solvers": 1,
    "mf_dist.counting": 1,
    "mf_dist.ranking": 1,
    "mf_dist.storage": 2,
    "mf_dist.runtime": 2,
    "mf_dist.terminal": 2,
    "mf_dist.trainers": 3,
    "mf_dist.config": 4,
    "mf_dist.stages": 5,
    "mf_dist.flows": 6,
    "mf_dist.commands": 6,
    "mf_dist.bench": 6,
    "mf_dist.cli": 7,
    "mf_dist.config_flags": 7,
    "mf_dist": 7,
}
MATH = ("mf_dist.blocks", "mf_dist.models", "mf_dist.solvers", "mf_dist.counting", "mf_dist.ranking")
# What the math layer may not touch: clusters and files.
NOT_IN_MATH = ("dask", "distributed", "pyarrow", "pandas", "prefect", "fsspec")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """The layer of ``module``: that of its longest registered prefix."""
    while module not in LAYERS:
        module = module.rpartition(".")[0]
    return LAYERS[module]


def _type_checking_blocks(tree: ast.Module) -> set[int]:
    """Ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            inside |= {id(child) for statement in node.body for child in ast.walk(statement)}
    return inside


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, but those only for type checking."""
    found = []
    tree = ast.parse(path.read_text(), str(path))
    annotations_only = _type_checking_blocks(tree)
    for node in ast.walk(tree):
        if id(node) in annotations_only:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from mf_dist import x` may name a module of the package.
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            if node.module == "mf_dist":
                found += [(node.lineno, name) for name in names]
            else:
                found.append((node.lineno, node.module))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    assert SOURCES
    for path in SOURCES:
        layer(module_name(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(REPO)))
def test_no_import_points_up(path):
    here = module_name(path)
    upward = [
        f"{path.relative_to(REPO)}:{line} imports {name} (layer {layer(name)} > {layer(here)})"
        for line, name in imports(path)
        if name.startswith("mf_dist") and layer(name) > layer(here)
    ]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(REPO)))
def test_only_the_flow_layer_imports_prefect_and_math_stays_math(path):
    here = module_name(path)
    names = [name for _, name in imports(path)]
    if not here.startswith("mf_dist.flows"):
        assert not [name for name in names if name.split(".")[0] == "prefect"], here
    if here.startswith(MATH):
        assert not [name for name in names if name.split(".")[0] in NOT_IN_MATH], here
