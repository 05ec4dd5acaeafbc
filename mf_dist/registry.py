"""Every model mf-dist trains, registered once.

A :class:`ModelSpec` holds all that the rest of the pipeline needs to know
about a model: its solvers (the first is the default) and the factory that
builds each solver's trainer, its default settings, the tables it publishes
and the id map each follows, whether it needs X = SᵀS, whether it needs a
rating column and publishes biases with a global mean, and how its held-out
quality is measured. The run configuration, the train stage, the evaluation
stage, the command line and the tests read these specs; nothing else names a
model to branch on it.

Adding a model is one objective module (``mf_dist/models/``), one trainer
module (``mf_dist/trainers/``) and one :func:`register` call at the end of
this file; docs/architecture.md walks through an example.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from distributed import Client, Future

    # Under TYPE_CHECKING only: mf_dist.settings validates names against this registry.
    from mf_dist.settings import AlsMethod, OptimizerName, TrainSettings
    from mf_dist.storage.ingested import IngestResult
    from mf_dist.trainers.epoch_loop import ShardedModel

    TrainerFactory = Callable[
        [Client, Path, IngestResult, TrainSettings, dict[str, float] | None, dict[str, list[Future]] | None],
        ShardedModel,
    ]

HoldoutMetric = Literal["rating_errors", "ranking"]
SeenItems = Literal["rated", "liked"]


@dataclass(frozen=True)
class IdMap:
    """Which ingest id map a published table's rows follow.

    ``path_attribute`` names the :class:`IngestResult` property holding the map,
    ``id_column`` the id column published with the table, ``side`` the seed
    stream of fresh rows (0 users, 1 items, 2 contexts).
    """

    path_attribute: Literal["users_path", "items_path"]
    id_column: str
    side: int


# A published table's name tells which id map its rows follow, whatever the model.
TABLE_ID_MAPS: dict[str, IdMap] = {
    "users": IdMap("users_path", "user_id", 0),
    "items": IdMap("items_path", "item_id", 1),
    # NMF of X = SᵀS: H's rows are items too.
    "contexts": IdMap("items_path", "item_id", 2),
}


@dataclass(frozen=True)
class ModelDefaults:
    """The settings whose good value depends on the objective (used when a run leaves them unset)."""

    epochs: int
    learning_rate: float
    rank: int
    regularization: float
    optimizer: OptimizerName = "adam"
    als_method: AlsMethod = "cg"


@dataclass(frozen=True)
class SolverSpec:
    """One solver of a model and the trainer class that runs it.

    ``trainer`` is ``"module:Class"``, a subclass of
    :class:`mf_dist.trainers.base.Trainer`, imported on first use so that the
    command line starts without torch and Dask (it reads the registry for its
    choices and defaults).
    """

    name: str
    trainer: str

    def factory(self) -> TrainerFactory:
        """The class's ``build``: (client, work dir, ingest, settings, resources, initial) → trainer."""
        module, _, attribute = self.trainer.partition(":")
        return getattr(importlib.import_module(module), attribute).build


@dataclass(frozen=True)
class ModelSpec:
    """One model: its solvers (first = default), defaults, tables and evaluation."""

    name: str
    summary: str
    solvers: dict[str, SolverSpec]
    defaults: ModelDefaults
    tables: Callable[[str], frozenset[str]]
    """Given ``settings.target``: the names of the tables the model publishes."""
    needs_cooccurrence: Callable[[str], bool] = field(default=lambda target: False)
    """Given ``settings.target``: whether the model fits X = SᵀS (the co-occurrence stage must run)."""
    needs_ratings: bool = False
    """Whether the input must have a rating column (the model fits rating values)."""
    has_global_mean: bool = False
    """Whether the published tables carry biases and a global mean (predicted ratings)."""
    holdout_metric: HoldoutMetric = "ranking"
    seen_items: SeenItems = "liked"
    """Which training ratings the model fitted, so count as seen: every ``rated`` item, or the
    ``liked`` ones (rating >= ingest's like threshold; all of them without one)."""

    fold_in: str | None = None
    """``"module:function"``: the exact user half-step against fixed items, for
    :func:`mf_dist.fold_in`; ``(rows, cols, values, n_rows, item_vectors, item_bias,
    global_mean, hyperparameters) → (vectors, bias or None)``. None: the model has none."""

    def fold_in_function(self) -> Callable:
        """The model's fold-in row solve, imported on use (ValueError when it has none)."""
        if self.fold_in is None:
            raise ValueError(f"the {self.name} model has no fold-in")
        module, _, attribute = self.fold_in.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def has_users(self, target: str) -> bool:
        """Given ``settings.target``: whether the model publishes user vectors (it can recommend)."""
        return "users" in self.tables(target)

    @property
    def default_solver(self) -> str:
        return next(iter(self.solvers))


MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a model to the registry (its name must be new)."""
    if spec.name in MODELS:
        raise ValueError(f"a model named {spec.name!r} is already registered")
    MODELS[spec.name] = spec
    return spec


def model_spec(name: str) -> ModelSpec:
    """The registered model ``name`` (KeyError names the registered ones)."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"no model {name!r}; registered: {', '.join(MODELS)}") from None


def _always(*tables: str) -> Callable[[str], frozenset[str]]:
    """The same tables whatever the target."""
    return lambda target: frozenset(tables)


def _solvers(**trainers: str) -> dict[str, SolverSpec]:
    """Solver name → its spec, from ``"module:Class"`` under ``mf_dist.trainers``."""
    return {name: SolverSpec(name, f"mf_dist.trainers.{trainer}") for name, trainer in trainers.items()}


# Co-occurrence: gradient (Adam), rank 64, 60 epochs. In a 5-fold sweep (docs/benchmarks.md)
# ALS's item vectors scored 7 % higher as item-kNN on MovieLens 100K but 25 % lower on the
# synthetic tiny set; rank 64 beat rank 32 on both.
register(
    ModelSpec(
        name="cooccurrence",
        summary="Item vectors whose dot products fit the co-occurrence counts X = SᵀS.",
        solvers=_solvers(
            gradient="cooccurrence_gradient:CooccurrenceGradient", als="cooccurrence_als:CooccurrenceALS"
        ),
        defaults=ModelDefaults(epochs=60, learning_rate=0.1, rank=64, regularization=0.0),
        tables=_always("items"),
        needs_cooccurrence=lambda target: True,
    )
)
# Explicit: chosen on MovieLens 100K (80/20 split, docs/benchmarks.md), where
# rank 64 with weighted-λ 0.12 reaches test RMSE ≈ 0.909 with either solver.
register(
    ModelSpec(
        name="explicit",
        summary="User and item vectors with biases that predict the rating values.",
        solvers=_solvers(als="explicit_als:ExplicitALS", gradient="explicit_gradient:ExplicitGradient"),
        defaults=ModelDefaults(
            epochs=20,
            learning_rate=0.1,
            rank=64,
            regularization=0.12,
            optimizer="adagrad",
            als_method="cholesky",
        ),
        tables=_always("users", "items"),
        needs_ratings=True,
        has_global_mean=True,
        holdout_metric="rating_errors",
        seen_items="rated",
        fold_in="mf_dist.models.explicit:fold_in_rows",
    )
)
# Implicit: λ 30 with log confidence, α 1 (mf_dist/settings.py): the best recall@10 of a
# 5-fold sweep on MovieLens 100K, and on the synthetic tiny set (docs/benchmarks.md).
register(
    ModelSpec(
        name="implicit",
        summary="User and item vectors for implicit feedback, confidence-weighted (Hu, Koren, Volinsky).",
        solvers=_solvers(als="implicit:ImplicitALS", gradient="implicit:ImplicitGradient"),
        defaults=ModelDefaults(epochs=15, learning_rate=0.01, rank=32, regularization=30.0, als_method="cg"),
        tables=_always("users", "items"),
        fold_in="mf_dist.models.implicit:fold_in_rows",
    )
)
# NMF's projected gradient steps learning_rate / λ_max(Gram): 1 is the classic
# 1/L step (never raises the loss); multiplicative updates need none. Neither
# solver regularises or uses an optimiser.
register(
    ModelSpec(
        name="nmf",
        summary="Non-negative factors of X = SᵀS (items, contexts) or of S itself (users, items).",
        solvers=_solvers(mu="nmf:NMFMultiplicative", gradient="nmf:NMFGradient"),
        defaults=ModelDefaults(epochs=200, learning_rate=1.0, rank=32, regularization=0.0),
        tables=lambda target: frozenset(
            {"items", "contexts"} if target == "cooccurrence" else {"users", "items"}
        ),
        needs_cooccurrence=lambda target: target == "cooccurrence",
    )
)
