"""The layers of docs/architecture.md, enforced: a lower layer never imports a higher one.

Every ``import`` statement of every module under ``mf_dist`` counts, those
inside functions too (a lazy import is still a dependency).
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
    "mf_dist.blocks": 1,
    "mf_dist.models": 1,
    "mf_dist.solvers": 1,
    "mf_dist.counting": 1,
    "mf_dist.storage": 2,
    "mf_dist.runtime": 2,
    "mf_dist.terminal": 2,
    "mf_dist.trainers": 3,
    "mf_dist.registry": 3,
    "mf_dist.config": 4,
    "mf_dist.stages": 5,
    "mf_dist.flows": 6,
    "mf_dist.commands": 6,
    "mf_dist.bench": 6,
    "mf_dist.cli": 7,
    "mf_dist": 7,
}
MATH = ("mf_dist.blocks", "mf_dist.models", "mf_dist.solvers", "mf_dist.counting")
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


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
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
