"""Training settings, declared once: as a run sets them and as the trainers read them.

:class:`TrainingOptions` declares each training setting once, with its type,
bounds, default and description. The run configuration
(:class:`~mf_dist.config.RunConfig`) extends it, and the command line makes
a flag of every field (:mod:`mf_dist.config_flags`). :class:`TrainSettings`
is the same fields with the per-model ones resolved, which is what the
trainers read: where a run leaves ``solver`` at ``"auto"`` or a
:class:`~mf_dist.registry.ModelDefaults` setting (rank, epochs, ...) unset,
the model's default from :mod:`mf_dist.registry` is filled in.

Model and solver names are the registry's, checked against
:data:`~mf_dist.registry.MODELS` when a value is validated: a registered
model is accepted by the config, the trainers and the command line with no
list of names to edit here. This module imports nothing of mf-dist but the
registry (which imports no torch or Dask), so the trainers, the run
configuration and the command line can all read it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from mf_dist.registry import MODELS, ModelDefaults, model_spec

OptimizerName = Literal["adam", "adagrad"]
AlsMethod = Literal["cg", "cholesky"]
ConfidenceName = Literal["binary", "linear", "log"]
CooccurrenceLoss = Literal["squared", "weighted"]
NmfTarget = Literal["cooccurrence", "ratings"]
XProducts = Literal["auto", "tiles", "likes"]
DuplicatePolicy = Literal["auto", "last", "sum", "mean", "error"]
DeviceName = Literal["auto", "cpu", "cuda"]
NeighborsMetric = Literal["cosine", "dot"]


@dataclasses.dataclass(frozen=True)
class Registered:
    """``Annotated`` metadata: the string must be one of ``names()``, read when a value is validated.

    Reading the names at validation time (not at import) means a model
    registered after this module was imported counts too. ``names`` gives
    them in the order to show (the flag's choices, the error message, the
    JSON schema's ``enum``).
    """

    kind: str
    names: Callable[[], list[str]]

    def check(self, value: str) -> str:
        """``value`` if registered; otherwise a validation error that lists the registered names."""
        names = self.names()
        if value not in names:
            # A custom error, not a ValueError: its message then reads without pydantic's
            # "Value error, " prefix, like the registry's own KeyError.
            raise PydanticCustomError(
                "not_registered",
                "no {kind} {value}; registered: {names}",
                {"kind": self.kind, "value": repr(value), "names": ", ".join(names)},
            )
        return value

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {**handler(schema), "enum": self.names()}


def model_names() -> list[str]:
    """The registered models, in registration order."""
    return list(MODELS)


def solver_names() -> list[str]:
    """Every solver some registered model has (sorted: they have no order across models)."""
    return sorted({solver for spec in MODELS.values() for solver in spec.solvers})


def solver_choices() -> list[str]:
    """What a run may ask for: ``auto`` (the model's default solver) or a registered solver."""
    return ["auto", *solver_names()]


ModelName = Annotated[str, Registered("model", model_names)]
SolverName = Annotated[str, Registered("solver", solver_names)]
SolverChoice = Annotated[str, Registered("solver", solver_choices)]

# Bounds of the per-model settings, shared by a run's optional value and the
# trainers' resolved one. A run has tighter upper bounds on some (declared on
# its fields): tests drive the trainers to divergence with learning_rate=1e30.
Rank = Annotated[int, Field(ge=1, le=1024)]
Epochs = Annotated[int, Field(ge=1)]
LearningRate = Annotated[float, Field(gt=0)]
Regularization = Annotated[float, Field(ge=0)]


class TrainingOptions(BaseModel):
    """Every setting of the train stage, declared once, as a run may set it.

    ``solver = "auto"`` and the settings left ``None`` take the model's
    defaults (see :class:`TrainSettings`). The field order is the order of
    :class:`TrainSettings`' dump, which the published manifests show.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelName = Field("cooccurrence", description="Objective to fit (see README, Models).")
    solver: SolverChoice = Field(
        "auto",
        description="One of the model's solvers; 'auto' picks its default (its first in mf_dist.registry).",
    )
    rank: Rank | None = Field(None, description="Embedding dimension k, 1-1024 (default per model).")
    epochs: Epochs | None = Field(
        None, le=100_000, description="Training epochs, at most (see tolerance); default per model."
    )
    learning_rate: LearningRate | None = Field(
        None, le=10, description="Step size of the gradient solvers (default per model)."
    )
    regularization: Regularization | None = Field(
        None, description="L2 weight (explicit: per observed rating, weighted-lambda); default per model."
    )
    batch_size: int = Field(1024, ge=1, description="Ratings per gradient step inside a block.")
    optimizer: OptimizerName | None = Field(
        None, description="Gradient solvers: adam or adagrad (default per model)."
    )
    # alpha and confidence: chosen by 5-fold cross-validation on MovieLens 100K and checked on
    # the synthetic tiny set (docs/benchmarks.md, "Choosing the defaults").
    alpha: float = Field(
        1.0, gt=0, description="Implicit model: the confidence scale alpha (see confidence)."
    )
    confidence: ConfidenceName = Field(
        "log",
        description=(
            "Implicit model: a liked entry's confidence from its value r: binary c = 1 + alpha, "
            "linear c = 1 + alpha * r, log c = 1 + alpha * log(1 + r / confidence_epsilon)."
        ),
    )
    confidence_epsilon: float = Field(
        1.0, gt=0, description="Implicit model, log confidence: epsilon of log(1 + r / epsilon)."
    )
    als_method: AlsMethod | None = Field(
        None,
        description=(
            "ALS row solves: conjugate gradient (Takacs et al.) or exact Cholesky "
            "(default: cholesky for explicit, cg for implicit)."
        ),
    )
    cg_steps: int = Field(
        3, ge=1, le=100, description="Conjugate-gradient steps per ALS row solve (--als-method cg)."
    )
    loss: CooccurrenceLoss = Field(
        "squared",
        description="Co-occurrence: all pairs (squared), or GloVe-style f(X) weights on non-zeros.",
    )
    weight_x_max: float = Field(100.0, gt=0, description="Weighted loss: f(x) = min(1, (x / x_max)^power).")
    weight_power: float = Field(0.75, gt=0, description="Weighted loss: the power of f(x).")
    log_target: bool = Field(False, description="Weighted loss: fit log X_ij instead of X_ij.")
    target: NmfTarget = Field(
        "cooccurrence", description="NMF: factorize X = S^T S or the liked matrix S itself."
    )
    x_products: XProducts = Field(
        "auto",
        description=(
            "Co-occurrence gradient and NMF of X: products X V from X's stored tiles, or as "
            "S^T (S V) from the likes (2 x likes x k work instead of nnz(X) x k); auto picks the cheaper."
        ),
    )
    tolerance: float = Field(
        1e-4, ge=0, description="Stop when an epoch improves the loss by less than this fraction (0: never)."
    )
    seed: int = Field(
        0, ge=0, description="Random seed: the same seed and worker count give the same results."
    )
    device: DeviceName = Field("auto", description="Where the workers compute: auto, cpu or cuda.")
    resume: bool = Field(False, description="Continue from the last checkpoint in the work directory.")
    init_from: str | None = Field(None, description="Warm start from the tables published under this output.")

    @model_validator(mode="after")
    def _solver_fits_model(self) -> TrainingOptions:
        solvers = model_spec(self.model).solvers
        if self.solver != "auto" and self.solver not in solvers:
            choices = ", ".join(solvers)
            raise ValueError(f"the {self.model} model has no solver {self.solver!r}; choose one of {choices}")
        return self


# The settings a model gives defaults for: ModelDefaults' fields, by name.
PER_MODEL_SETTINGS = tuple(field.name for field in dataclasses.fields(ModelDefaults))


class TrainSettings(TrainingOptions):
    """The training settings as the trainers read them: every value concrete.

    Built by :attr:`mf_dist.config.RunConfig.train_settings`, or directly
    (tests, bench). Either way, ``solver`` left out or ``"auto"`` becomes
    the model's default solver, and each per-model setting
    (:data:`PER_MODEL_SETTINGS`) left out or ``None`` becomes the model's
    default from :mod:`mf_dist.registry`; the other fields keep the defaults
    of :class:`TrainingOptions`. Only the types of the resolved fields are
    declared here: bounds and descriptions are :class:`TrainingOptions`'.
    """

    solver: SolverName
    rank: Rank
    epochs: Epochs
    learning_rate: LearningRate
    regularization: Regularization
    optimizer: OptimizerName
    als_method: AlsMethod

    @model_validator(mode="before")
    @classmethod
    def _resolve_per_model(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        model = data.get("model", cls.model_fields["model"].default)
        spec = MODELS.get(model) if isinstance(model, str) else None
        if spec is None:
            return data  # the model field reports the unknown model
        resolved = dict(data)
        if resolved.get("solver", "auto") == "auto":
            resolved["solver"] = spec.default_solver
        for name in PER_MODEL_SETTINGS:
            if resolved.get(name) is None:
                resolved[name] = getattr(spec.defaults, name)
        return resolved
