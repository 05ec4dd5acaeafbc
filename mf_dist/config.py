"""The typed run configuration: one schema, validated when loaded.

A run is configured by a TOML file (``--config run.toml``), command-line flags
(which override the file) or both. Unknown keys and wrong types are rejected
with a :class:`~mf_dist.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import itertools
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from mf_dist.errors import ConfigError
from mf_dist.registry import ModelDefaults, model_spec
from mf_dist.runtime.cluster_settings import ClusterSettings, default_worker_count
from mf_dist.settings import DuplicatePolicy, NeighborsMetric, TrainingOptions, TrainSettings
from mf_dist.storage.filesystems import check_url, is_remote, join, local_path


class RunConfig(TrainingOptions):
    """Everything a pipeline run needs; defaults work for a first run.

    The training settings are :class:`~mf_dist.settings.TrainingOptions`'
    (the per-model ones default per model, see :mod:`mf_dist.registry`);
    the fields below are the rest of a run. Paths are local paths or globs.
    Every field is also a flag of ``mf-dist run`` (:mod:`mf_dist.config_flags`),
    its description the flag's help.
    """

    input: str = Field(
        description="Parquet file, directory of Parquet files, or glob of ratings; a path or a URL (s3://...)."
    )
    output: str = Field(
        description="Directory or URL (s3://bucket/prefix) that receives the published tables."
    )
    work_dir: str | None = Field(
        None,
        description=(
            "Intermediate data: a directory or a URL (s3://bucket/prefix), which the workers read and "
            "write (default: <output>/_work)."
        ),
    )
    storage_options: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Options of the object store's filesystem (fsspec), e.g. endpoint_url or region_name; "
            "config file only ([storage_options]); keep credentials in the store's own chain (the run "
            "config is also the Prefect flow run's parameters)."
        ),
        json_schema_extra={"flag": False},
    )

    block_size: int = Field(
        4096, ge=16, le=1 << 20, description="Users or items per block (memory per task)."
    )
    holdout: float = Field(
        0.0,
        ge=0,
        lt=0.9,
        description=(
            "Share of ratings kept out of training to evaluate on: RMSE/MAE or recall@10/NDCG@10 (0: none)."
        ),
    )

    user_col: str = Field("user_id", description="User id column.")
    item_col: str = Field("item_id", description="Item id column.")
    rating_col: str = Field(
        "rating", description="Rating column; absent from the files means implicit feedback (1.0)."
    )
    timestamp_col: str = Field("timestamp", description="Timestamp column, used for duplicates when present.")
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
        default_factory=default_worker_count,
        ge=1,
        le=1024,
        description=(
            "Dask workers: processes of the local cluster, SLURM jobs or Kubernetes pods "
            "(default: the CPU count, at most 8)."
        ),
    )
    threads_per_worker: int = Field(1, ge=1, le=256, description="Threads per worker process.")
    scheduler: str | None = Field(
        None, description="Address of an existing Dask scheduler to join instead (tcp://host:port)."
    )
    cluster: ClusterSettings = Field(
        default_factory=ClusterSettings,
        description=(
            "Where workers come from: local, slurm or kubernetes (the flag picks the kind; "
            "each kind's settings are the config file's [cluster.*] tables)."
        ),
    )

    retries: int = Field(1, ge=0, le=100, description="Retries of a stage after a transient failure.")
    retry_delay_seconds: float = Field(10.0, ge=0, le=86_400, description="Seconds between those retries.")
    cache: bool = Field(True, description="Reuse finished stages with the same input, settings and code.")

    neighbors: int = Field(
        0, ge=0, le=10_000, description="After export, publish each item's top-N similar items (0: skip)."
    )
    neighbors_metric: NeighborsMetric = Field("cosine", description="Similarity of the neighbors.")
    ann: Literal["none", "faiss", "hnsw"] = Field(
        "none",
        description="After export, publish an ANN index of the items for user queries (none: skip).",
    )
    recommend: int = Field(
        0,
        ge=0,
        le=10_000,
        description=(
            "After export, publish each user's top-N unseen items as the recommendations table "
            "(0: skip; models with user vectors only)."
        ),
    )

    @model_validator(mode="after")
    def _one_source_of_workers(self) -> RunConfig:
        if self.scheduler and self.cluster.kind != "local":
            raise ValueError(f"scheduler and cluster.kind = {self.cluster.kind!r} both say where workers are")
        return self

    @field_validator("input", "output", "work_dir")
    @classmethod
    def _file_urls_are_paths(cls, value: str | None) -> str | None:
        # file:///data/x is /data/x: every local code path then sees a plain path.
        return None if value is None else local_path(value)

    @model_validator(mode="after")
    def _urls_are_usable(self) -> RunConfig:
        for name in ("input", "output", "work_dir", "init_from"):
            value = getattr(self, name, None)
            if value is not None:
                try:
                    check_url(str(value))
                except ConfigError as exc:
                    raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _paths_differ(self) -> RunConfig:
        if is_remote(self.input) or is_remote(self.output):
            if self.input.rstrip("/") == self.output.rstrip("/"):
                raise ValueError("output must differ from input")
            return self
        if Path(self.output).resolve() == Path(self.input).resolve():
            raise ValueError("output must differ from input")
        # Input directories are read recursively: tables or work files written
        # inside one would be read back as ratings by the next run.
        source = input_directory(self.input)
        for name, path in (("output", self.output), ("work_dir", self.work_dir)):
            if path is not None and not is_remote(path) and Path(path).resolve().is_relative_to(source):
                raise ValueError(
                    f"{name} {path!r} is inside the input directory {str(source)!r}, whose files are all "
                    f"read as ratings; choose an {name} outside it"
                )
        return self

    @model_validator(mode="after")
    def _recommend_needs_users(self) -> RunConfig:
        if self.recommend and not model_spec(self.model).has_users(self.target):
            raise ValueError(
                f"recommend = {self.recommend}: the {self.model} model (target {self.target}) has no user "
                "vectors to recommend with"
            )
        return self

    @model_validator(mode="after")
    def _rating_range_is_a_range(self) -> RunConfig:
        if self.rating_min is not None and self.rating_max is not None and self.rating_min > self.rating_max:
            raise ValueError(f"rating_min {self.rating_min} is above rating_max {self.rating_max}")
        return self

    @property
    def needs_cooccurrence(self) -> bool:
        """Whether the model fits X = SᵀS (so the co-occurrence stage must run)."""
        return model_spec(self.model).needs_cooccurrence(self.target)

    @property
    def train_settings(self) -> TrainSettings:
        """What the train stage reads: every training field of this run, the per-model ones resolved.

        The fields are taken by name (all of TrainSettings' fields are this
        config's); :class:`~mf_dist.settings.TrainSettings` fills in the
        model's defaults for those left unset.
        """
        return TrainSettings(**{name: getattr(self, name) for name in TrainSettings.model_fields})

    @property
    def defaults(self) -> ModelDefaults:
        """The model's defaults for the settings left unset."""
        return model_spec(self.model).defaults

    @property
    def resolved_solver(self) -> str:
        return self.train_settings.solver

    @property
    def resolved_epochs(self) -> int:
        return self.train_settings.epochs

    @property
    def resolved_rank(self) -> int:
        return self.train_settings.rank

    @property
    def resolved_regularization(self) -> float:
        return self.train_settings.regularization

    @property
    def resolved_learning_rate(self) -> float:
        return self.train_settings.learning_rate

    @property
    def resolved_work_dir(self) -> Path:
        """The local work directory (use :attr:`work_location`, which may also be a URL)."""
        return Path(local_path(self.work_dir)) if self.work_dir else Path(local_path(self.output)) / "_work"

    @property
    def work_location(self) -> str:
        """The work directory as a path or a URL: ``work_dir``, else ``<output>/_work``."""
        if self.work_dir is not None and is_remote(self.work_dir):
            return self.work_dir.rstrip("/")
        if self.work_dir is None and is_remote(self.output):
            return join(self.output, "_work")
        return str(self.resolved_work_dir)


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


def table_kind(field: FieldInfo) -> FieldInfo | None:
    """The ``kind`` field of a setting that is a table of its own (like ``[cluster]``), else None.

    Such a table is set in the config file; a flag or an override given as a
    string sets only its kind, and the file's other settings of the table stay.
    """
    annotation = field.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation.model_fields.get("kind")
    return None


def load_config(path: str | Path | None = None, **overrides: Any) -> RunConfig:
    """Build a :class:`RunConfig` from a TOML file and overrides (flags win).

    Overrides whose value is ``None`` are ignored so that unset CLI flags keep
    the file's value. A string for a table with a kind (``cluster="slurm"``)
    sets that kind and keeps the rest of the file's table (see :func:`table_kind`).
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
        field = RunConfig.model_fields.get(key)
        if isinstance(value, str) and field is not None and table_kind(field) is not None:
            # ``--cluster slurm`` picks the kind and keeps the file's [cluster.slurm] settings.
            values[key] = {**values.get(key, {}), "kind": value}
        else:
            values[key] = value
    try:
        return RunConfig(**values)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from exc
