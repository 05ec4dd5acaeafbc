"""Each registered solver names one Trainer class, <Model><Solver>; the layers keep their imports apart."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mf_dist.registry import MODELS
from mf_dist.trainers.base import Trainer
from mf_dist.trainers.cooccurrence_gradient import CooccurrenceGradient
from mf_dist.trainers.cooccurrence_weighted_gradient import CooccurrenceWeightedGradient
from tests.support.paths import REPO
from tests.support.training import settings

MODEL_WORDS = {"cooccurrence": "Cooccurrence", "explicit": "Explicit", "implicit": "Implicit", "nmf": "NMF"}
SOLVER_WORDS = {"als": "ALS", "gradient": "Gradient", "mu": "Multiplicative"}
MODEL_SOLVER_PAIRS = sorted((spec.name, solver) for spec in MODELS.values() for solver in spec.solvers)


@pytest.mark.parametrize(("model", "solver"), MODEL_SOLVER_PAIRS)
def test_each_solver_is_built_by_its_own_trainer_class(model, solver):
    factory = MODELS[model].solvers[solver].factory()
    trainer = factory.__self__
    assert issubclass(trainer, Trainer)
    assert factory == trainer.build
    assert trainer.__name__ == MODEL_WORDS[model] + SOLVER_WORDS[solver]


def test_the_weighted_cooccurrence_loss_has_its_own_gradient_trainer():
    weighted = settings("cooccurrence", "gradient", loss="weighted")
    assert CooccurrenceGradient._variant(weighted) is CooccurrenceWeightedGradient
    assert CooccurrenceGradient._variant(settings("cooccurrence", "gradient")) is CooccurrenceGradient


# Imports every module of the named packages in a fresh interpreter and prints
# the top-level packages (mf_dist's by subpackage) that ended up loaded.
LOADED_BY = """
import importlib, pkgutil, sys
for package in sys.argv[1:]:
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        importlib.import_module(f"{package}.{info.name}")
names = {".".join(n.split(".")[:2]) if n.startswith("mf_dist.") else n.split(".")[0] for n in sys.modules}
print(" ".join(sorted(names)))
"""


@pytest.mark.parametrize(
    ("packages", "forbidden"),
    [
        (["mf_dist.trainers"], {"prefect", "mf_dist.stages", "mf_dist.flows"}),
        (["mf_dist.models", "mf_dist.solvers"], {"dask", "distributed", "prefect", "mf_dist.trainers"}),
    ],
)
def test_layers_import_only_what_they_may(packages, forbidden):
    loaded = subprocess.run(
        [sys.executable, "-c", LOADED_BY, *packages],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
        timeout=120,
    ).stdout.split()
    assert forbidden.isdisjoint(loaded), sorted(forbidden.intersection(loaded))
