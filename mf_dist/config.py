"""The typed run configuration: one schema, validated when loaded.

A run is configured by a TOML file (``--config run.toml``), command-line flags
(which override the file) or both. Unknown keys and wrong types are rejected
with a :class:`~mf_dist.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mf_dist.errors import ConfigError

ModelName = Literal["cooccurrence", "explicit"]
DuplicatePolicy = Literal["auto", "last", "sum", "mean", "error"]
DeviceName = Literal["auto", "cpu", "cuda"]

# Per-model defaults for the settings whose good value depends on the objective.
MODEL_DEFAULTS: dict[str, dict[str, float | int]] = {
    "cooccurrence": {"epochs": 60, "learning_rate": 0.1},
    "explicit": {"epochs": 20, "learning_rate": 0.005},
}


class RunConfig(BaseModel):
    """Everything a pipeline run needs; defaults work for a first run.

    Paths are local paths or globs. ``epochs`` and ``learning_rate`` default
    per model (see ``MODEL_DEFAULTS``) when left unset.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = Field(description="Directory of Parquet files, a single file, or a glob.")
    output: str = Field(description="Directory that receives the published tables.")
    work_dir: str | None = Field(None, description="Intermediate data (default: <output>/_work).")

    model: ModelName = "cooccurrence"
    rank: int = Field(32, ge=1, le=1024, description="Embedding dimension k.")
    epochs: int | None = Field(None, ge=1, le=100_000)
    learning_rate: float | None = Field(None, gt=0, le=10)
    regularization: float = Field(0.05, ge=0, description="L2 weight per observed rating (weighted-lambda).")
    batch_size: int = Field(1024, ge=1, description="Ratings per gradient step inside a block.")
    block_size: int = Field(
        4096, ge=16, le=1 << 20, description="Users or items per block (memory per task)."
    )
    seed: int = Field(0, ge=0)

    user_col: str = "user_id"
    item_col: str = "item_id"
    rating_col: str = Field("rating", description="Absent from the files means implicit feedback (1.0).")
    timestamp_col: str = Field("timestamp", description="Used for duplicates when present.")
    like_threshold: float | None = Field(
        None, description="A rating >= this counts as 'liked' in S; unset: every rating."
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
        description="Worker processes of the local Dask cluster.",
    )
    threads_per_worker: int = Field(1, ge=1, le=256)
    scheduler: str | None = Field(None, description="Address of an existing Dask scheduler to join instead.")
    device: DeviceName = "auto"

    @model_validator(mode="after")
    def _paths_differ(self) -> RunConfig:
        if Path(self.output).resolve() == Path(self.input).resolve():
            raise ValueError("output must differ from input")
        return self

    @property
    def resolved_epochs(self) -> int:
        return int(self.epochs or MODEL_DEFAULTS[self.model]["epochs"])

    @property
    def resolved_learning_rate(self) -> float:
        return float(self.learning_rate or MODEL_DEFAULTS[self.model]["learning_rate"])

    @property
    def resolved_work_dir(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.output) / "_work"


def describe_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: the key, what is wrong, and the value given."""
    lines = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(config)"
        if problem["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}")
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
    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return RunConfig(**values)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from exc
