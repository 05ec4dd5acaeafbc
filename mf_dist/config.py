"""The typed run configuration: one schema, validated when loaded.

A run is configured by a TOML file (``--config run.toml``), command-line flags
(which override the file) or both. Unknown keys and wrong types are rejected
with a :class:`~mf_dist.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import itertools
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mf_dist.errors import ConfigError
from mf_dist.registry import ModelDefaults, model_spec
from mf_dist.runtime.cluster_settings import ClusterSettings
from mf_dist.settings import (
    AlsMethod,
    CooccurrenceLoss,
    DeviceName,
    DuplicatePolicy,
    ModelName,
    NmfTarget,
    OptimizerName,
    SolverName,
    TrainSettings,
    XProducts,
)


class RunConfig(BaseModel):
    """Everything a pipeline run needs; defaults work for a first run.

    Paths are local paths or globs. ``epochs`` and ``learning_rate`` default
    per model (see :mod:`mf_dist.registry`) when left unset.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = Field(description="Directory of Parquet files, a single file, or a glob.")
    output: str = Field(description="Directory that receives the published tables.")
    work_dir: str | None = Field(None, description="Intermediate data (default: <output>/_work).")

    model: ModelName = "cooccurrence"
    solver: SolverName = Field(
        "auto", description="'auto' picks the model's default (its first solver in mf_dist.registry)."
    )
    rank: int | None = Field(None, ge=1, le=1024, description="Embedding dimension k (default per model).")
    epochs: int | None = Field(None, ge=1, le=100_000)
    learning_rate: float | None = Field(None, gt=0, le=10)
    regularization: float | None = Field(
        None,
        ge=0,
        description="L2 weight (explicit: per observed rating, weighted-lambda); default per model.",
    )
    batch_size: int = Field(1024, ge=1, description="Ratings per gradient step inside a block.")
    block_size: int = Field(
        4096, ge=16, le=1 << 20, description="Users or items per block (memory per task)."
    )
    seed: int = Field(0, ge=0)
    optimizer: OptimizerName | None = Field(
        None, description="Gradient solvers: adam or adagrad (default per model)."
    )
    alpha: float = Field(10.0, gt=0, description="Implicit model: confidence c = 1 + alpha * r.")
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
    weight_power: float = Field(0.75, gt=0)
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
    holdout: float = Field(
        0.0, ge=0, lt=0.9, description="Share of ratings kept out of training to evaluate on (0: none)."
    )
    resume: bool = Field(False, description="Continue from the last checkpoint in the work directory.")
    init_from: str | None = Field(None, description="Warm start from the tables published under this output.")

    user_col: str = "user_id"
    item_col: str = "item_id"
    rating_col: str = Field("rating", description="Absent from the files means implicit feedback (1.0).")
    timestamp_col: str = Field("timestamp", description="Used for duplicates when present.")
    like_threshold: float | None = Field(
        None, description="A rating >= this counts as 'liked' in S; unset: every rating."
    )
    rating_min: float | None = Field(
        None, description="Reject input with a rating below this (e.g. 1 for 1-5 stars); unset: no bound."
    )
    rating_max: float | None = Field(
        None, description="Reject input with a rating above this (e.g. 5 for 1-5 stars); unset: no bound."
    )
    duplicates: DuplicatePolicy = Field(
        "auto",
        description=(
            "Repeated (user, item) pairs: 'last' by timestamp, 'sum', 'mean' or 'error'; "
            "'auto' is 'last' when there is a timestamp column, else 'sum' for implicit "
            "feedback, else 'error'."
        ),
    )

    workers: int = Field(
        default_factory=lambda: max(1, min(os.cpu_count() or 1, 8)),
        ge=1,
        le=1024,
        description="Dask workers: processes of the local cluster, SLURM jobs or Kubernetes pods.",
    )
    threads_per_worker: int = Field(1, ge=1, le=256)
    scheduler: str | None = Field(None, description="Address of an existing Dask scheduler to join instead.")
    cluster: ClusterSettings = Field(
        default_factory=ClusterSettings, description="Local, SLURM or Kubernetes (see cluster_settings)."
    )
    device: DeviceName = "auto"

    retries: int = Field(1, ge=0, le=100, description="Retries of a stage after a transient failure.")
    retry_delay_seconds: float = Field(10.0, ge=0, le=86_400)
    cache: bool = Field(True, description="Reuse finished stages with the same input, settings and code.")

    neighbors: int = Field(
        0, ge=0, le=10_000, description="After export, publish each item's top-N similar items (0: skip)."
    )
    neighbors_metric: Literal["cosine", "dot"] = Field("cosine", description="Similarity of the neighbors.")

    @model_validator(mode="after")
    def _one_source_of_workers(self) -> RunConfig:
        if self.scheduler and self.cluster.kind != "local":
            raise ValueError(f"scheduler and cluster.kind = {self.cluster.kind!r} both say where workers are")
        return self

    @model_validator(mode="after")
    def _paths_differ(self) -> RunConfig:
        if Path(self.output).resolve() == Path(self.input).resolve():
            raise ValueError("output must differ from input")
        # Input directories are read recursively: tables or work files written
        # inside one would be read back as ratings by the next run.
        source = input_directory(self.input)
        for name, path in (("output", self.output), ("work_dir", self.work_dir)):
            if path is not None and Path(path).resolve().is_relative_to(source):
                raise ValueError(
                    f"{name} {path!r} is inside the input directory {str(source)!r}, whose files are all "
                    f"read as ratings; choose an {name} outside it"
                )
        return self

    @model_validator(mode="after")
    def _rating_range_is_a_range(self) -> RunConfig:
        if self.rating_min is not None and self.rating_max is not None and self.rating_min > self.rating_max:
            raise ValueError(f"rating_min {self.rating_min} is above rating_max {self.rating_max}")
        return self

    @model_validator(mode="after")
    def _solver_fits_model(self) -> RunConfig:
        solvers = model_spec(self.model).solvers
        if self.solver != "auto" and self.solver not in solvers:
            choices = ", ".join(solvers)
            raise ValueError(f"the {self.model} model has no solver {self.solver!r}; choose one of {choices}")
        return self

    @property
    def needs_cooccurrence(self) -> bool:
        """Whether the model fits X = SᵀS (so the co-occurrence stage must run)."""
        return model_spec(self.model).needs_cooccurrence(self.target)

    @property
    def resolved_solver(self) -> str:
        return model_spec(self.model).default_solver if self.solver == "auto" else self.solver

    @property
    def train_settings(self) -> TrainSettings:
        """What the train stage needs, with per-model defaults filled in."""
        return TrainSettings(
            model=self.model,
            solver=self.resolved_solver,
            rank=self.resolved_rank,
            epochs=self.resolved_epochs,
            learning_rate=self.resolved_learning_rate,
            regularization=self.resolved_regularization,
            batch_size=self.batch_size,
            optimizer=self.optimizer or self.defaults.optimizer,
            alpha=self.alpha,
            als_method=self.als_method or self.defaults.als_method,
            cg_steps=self.cg_steps,
            loss=self.loss,
            weight_x_max=self.weight_x_max,
            weight_power=self.weight_power,
            log_target=self.log_target,
            target=self.target,
            x_products=self.x_products,
            tolerance=self.tolerance,
            seed=self.seed,
            device=self.device,
            resume=self.resume,
            init_from=self.init_from,
        )

    @property
    def defaults(self) -> ModelDefaults:
        """The model's defaults for the settings left unset."""
        return model_spec(self.model).defaults

    @property
    def resolved_epochs(self) -> int:
        return self.epochs or self.defaults.epochs

    @property
    def resolved_rank(self) -> int:
        return self.rank or self.defaults.rank

    @property
    def resolved_regularization(self) -> float:
        if self.regularization is not None:
            return self.regularization
        return self.defaults.regularization

    @property
    def resolved_learning_rate(self) -> float:
        return self.learning_rate or self.defaults.learning_rate

    @property
    def resolved_work_dir(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.output) / "_work"


def input_directory(path: str) -> Path:
    """The directory whose files an input path may read: a directory itself, a glob's fixed prefix.

    For a single file it is the file itself (nothing can be written inside it).
    """
    parts = Path(path).parts
    fixed = list(itertools.takewhile(lambda part: not set(part) & set("*?["), parts))
    return Path(*fixed).resolve() if fixed else Path.cwd()


def describe_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: the key, what is wrong, and the value given."""
    lines = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(config)"
        if problem["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}")
        elif not problem["loc"]:
            lines.append(str(problem["msg"]).removeprefix("Value error, "))
        else:
            lines.append(f"{key}: {problem['msg']} (got {problem.get('input')!r})")
    return f"invalid configuration in {source}: " + "; ".join(lines)


def load_config(path: str | Path | None = None, **overrides: Any) -> RunConfig:
    """Build a :class:`RunConfig` from a TOML file and overrides (flags win).

    Overrides whose value is ``None`` are ignored so that unset CLI flags keep
    the file's value.
    """
    values: dict[str, Any] = {}
    source = "command-line flags"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as handle:
                values.update(tomllib.load(handle))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "cluster" and isinstance(value, str):
            # ``--cluster slurm`` picks the kind and keeps the file's [cluster.slurm] settings.
            values["cluster"] = {**values.get("cluster", {}), "kind": value}
        else:
            values[key] = value
    try:
        return RunConfig(**values)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from exc
