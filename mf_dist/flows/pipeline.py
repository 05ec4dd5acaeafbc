"""The mf-dist pipeline as a Prefect flow: ingest → co-occurrence → train → export.

Each stage is a named task that connects to the run's Dask cluster by
address, calls one stage function of :mod:`mf_dist` and reports its wall
time and peak memory. Stages retry after a transient failure
(``retries``/``retry_delay_seconds``; never after an error of mf-dist's own
types, which a retry cannot fix) and are cached by a key of the input
fingerprint, their settings and the code (:mod:`mf_dist.flows.stage_cache`), so a
re-run after a late failure skips the stages that finished. Export always
runs: every run publishes a new run id. Export writes the run's tables without
moving ``LATEST``; the optional ``neighbors`` and ``recommendations`` stages
compute theirs from that unpublished run, and a last ``publish`` task moves
every table's ``LATEST`` to the run, so the derived tables are current
exactly when the tables they come from are. The per-epoch loss becomes a table
artifact and the loss curve a markdown artifact.

Run it with ``mf-dist run`` / ``mf-dist demo``, from a deployment
(``deploy/prefect.yaml``, ``mf-dist serve``), or call
:func:`factorization_pipeline` with a :class:`~mf_dist.config.RunConfig`;
no Prefect server needs to be started by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from distributed import Client
from prefect import Task, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from pydantic import BaseModel

from mf_dist.config import RunConfig
from mf_dist.errors import MfDistError
from mf_dist.flows.artifacts import publish_loss_artifacts
from mf_dist.flows.run_logs import keep_our_errors_to_one_line
from mf_dist.flows.stage_cache import (
    StageKeyPolicy,
    clear_stamp,
    result_storage,
    stage_key,
    stamp_matches,
    stored_result_is_json,
    write_stamp,
)
from mf_dist.runtime.cluster import open_client
from mf_dist.runtime.memory_monitor import PeakMemoryMonitor
from mf_dist.stages.ann import AnnResult, build_ann
from mf_dist.stages.cooccur import cooccurrence_blocks
from mf_dist.stages.evaluation import holdout_metrics
from mf_dist.stages.export import ExportResult, export_tables, publish_tables
from mf_dist.stages.ingest import ingest_ratings
from mf_dist.stages.neighbors import NeighborsResult, item_neighbors
from mf_dist.stages.recommend import RecommendResult, recommend_items
from mf_dist.stages.train import train_factors
from mf_dist.storage.factor_files import EpochRecord, TrainResult
from mf_dist.storage.ingested import IngestResult
from mf_dist.storage.input_files import input_fingerprint, list_input_files
from mf_dist.storage.output_lock import exclusive_run, remove_debris
from mf_dist.storage.publish import new_run_id
from mf_dist.storage.store import (
    exists,
    is_remote,
    join,
    list_names,
    read_bytes,
    storage_options_in_use,
    storage_options_shared,
)
from mf_dist.storage.tiles import CooccurrenceResult

Result = TypeVar("Result")

MEBIBYTE = 1024 * 1024
STAGE_CACHE = StageKeyPolicy()

# Settings that change where or how a run executes, never what a stage computes.
# The number of workers is not among them (results are reproducible per seed
# *and* worker count): the key uses the count the scheduler actually has.
OPERATIONAL_SETTINGS = frozenset(
    {
        "output",
        "storage_options",
        "workers",
        "threads_per_worker",
        "scheduler",
        "cluster",
        "retries",
        "retry_delay_seconds",
        "cache",
        # The neighbours stage runs after export and is never cached itself.
        "neighbors",
        "neighbors_metric",
        # So does the recommendations stage.
        "recommend",
        "ann",
    }
)


class StageReport(BaseModel):
    """Wall time and peak memory of one stage (memory of this host's processes)."""

    name: str
    seconds: float
    peak_process_mib: float
    peak_total_mib: float


class PipelineSummary(BaseModel):
    """What a run did, for the CLI and for callers of the flow."""

    run_id: str
    model: str
    rank: int
    epochs: int
    output: str
    device: str
    n_users: int
    n_items: int
    n_ratings: int
    n_likes: int
    final_loss: float
    final_metrics: dict[str, float]
    loss_history: list[EpochRecord]
    evaluation: dict[str, float] = {}
    export: ExportResult
    neighbors: NeighborsResult | None = None
    recommendations: RecommendResult | None = None
    ann: AnnResult | None = None
    stages: list[StageReport]


def _run_stage(name: str, scheduler: str, body: Callable[[Client], Result]) -> tuple[Result, StageReport]:
    started = time.perf_counter()
    with PeakMemoryMonitor() as memory, Client(scheduler, set_as_default=False) as client:
        result = body(client)
    report = StageReport(
        name=name,
        seconds=round(time.perf_counter() - started, 3),
        peak_process_mib=round(memory.peak_process_bytes / MEBIBYTE, 1),
        peak_total_mib=round(memory.peak_total_bytes / MEBIBYTE, 1),
    )
    get_run_logger().info(
        "%s: %.1f s, peak %.0f MiB per process", name, report.seconds, report.peak_process_mib
    )
    return result, report


def _stamped(stage: str, work_dir: str, key: str, run: Callable[[], Result]) -> Result:
    clear_stamp(work_dir, stage)
    result = run()
    write_stamp(work_dir, stage, key)
    return result


def is_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry condition: anything but mf-dist's own errors (bad input or config), which recur."""
    return not isinstance(state.result(raise_on_failure=False), MfDistError)


def ingest_arguments(config: RunConfig) -> dict[str, Any]:
    """The settings the ingest stage reads: its keyword arguments, and part of its stage key."""
    return {
        "user_col": config.user_col,
        "item_col": config.item_col,
        "rating_col": config.rating_col,
        "timestamp_col": config.timestamp_col,
        "like_threshold": config.like_threshold,
        "rating_min": config.rating_min,
        "rating_max": config.rating_max,
        "duplicates": config.duplicates,
        "block_size": config.block_size,
        # The split depends on the seed only when there is one.
        **({"holdout": config.holdout, "seed": config.seed} if config.holdout else {}),
    }


@task(name="ingest", cache_policy=STAGE_CACHE, retry_condition_fn=is_transient, result_serializer="json")
def ingest_task(scheduler: str, config: RunConfig, stage_key: str) -> tuple[IngestResult, StageReport]:
    """Input Parquet → indexed ratings in the work directory."""
    work_dir = config.work_location
    return _stamped(
        "ingest",
        work_dir,
        stage_key,
        lambda: _run_stage(
            "ingest",
            scheduler,
            lambda client: ingest_ratings(
                client,
                config.input,
                work_dir,
                **ingest_arguments(config),
                storage_options=config.storage_options,
            ),
        ),
    )


@task(
    name="cooccurrence", cache_policy=STAGE_CACHE, retry_condition_fn=is_transient, result_serializer="json"
)
def cooccurrence_task(
    scheduler: str, config: RunConfig, ingest: IngestResult, stage_key: str
) -> tuple[CooccurrenceResult, StageReport]:
    """Indexed ratings → tiles of X = SᵀS in the work directory."""
    work_dir = config.work_location
    return _stamped(
        "cooccurrence",
        work_dir,
        stage_key,
        lambda: _run_stage(
            "cooccurrence", scheduler, lambda client: cooccurrence_blocks(client, ingest, work_dir)
        ),
    )


@task(name="train", cache_policy=STAGE_CACHE, retry_condition_fn=is_transient, result_serializer="json")
def train_task(scheduler: str, config: RunConfig, stage_key: str) -> tuple[TrainResult, StageReport]:
    """Ingested data (and co-occurrence tiles) → factor blocks in the work directory."""
    return _stamped("train", config.work_location, stage_key, lambda: _train(scheduler, config))


def _train(scheduler: str, config: RunConfig) -> tuple[TrainResult, StageReport]:
    logger = get_run_logger()

    def log_epoch(record: EpochRecord) -> None:
        metrics = ", ".join(f"{name} {value:.4g}" for name, value in record.metrics.items())
        logger.info("epoch %d: loss %.6g %s", record.epoch, record.loss, f"({metrics})" if metrics else "")

    return _run_stage(
        "train",
        scheduler,
        lambda client: train_factors(client, config.work_location, config.train_settings, on_epoch=log_epoch),
    )


@task(name="export", cache_policy=NO_CACHE, retry_condition_fn=is_transient, result_serializer="json")
def export_task(
    scheduler: str,
    config: RunConfig,
    ingest: IngestResult,
    trained: TrainResult,
    run_id: str,
    evaluation: dict[str, float],
) -> tuple[ExportResult, StageReport]:
    return _run_stage(
        "export",
        scheduler,
        lambda client: export_tables(
            client,
            trained,
            ingest,
            config.output,
            run_id=run_id,
            config=config.model_dump(mode="json"),
            extra_manifest={"evaluation": evaluation} if evaluation else None,
            storage_options=config.storage_options,
            # LATEST moves in publish_task, after the tables derived from these.
            publish=False,
        ),
    )


@task(name="evaluate", cache_policy=NO_CACHE, result_serializer="json")
def evaluate_task(scheduler: str, ingest: IngestResult, trained: TrainResult) -> dict[str, float]:
    """Held-out metrics: RMSE/MAE for explicit ratings, recall@10/NDCG@10 of held-out likes otherwise."""
    with Client(scheduler, set_as_default=False) as client:
        return holdout_metrics(client, ingest, trained)


@task(name="neighbors", cache_policy=NO_CACHE, retry_condition_fn=is_transient, result_serializer="json")
def neighbors_task(scheduler: str, config: RunConfig, run_id: str) -> tuple[NeighborsResult, StageReport]:
    return _run_stage(
        "neighbors",
        scheduler,
        lambda client: item_neighbors(
            client,
            join(config.output, "items", "runs", run_id),
            config.neighbors,
            config.neighbors_metric,
            output=config.output,
            block_size=config.block_size,
            run_id=run_id,
            device=config.device,
            publish=False,
        ),
    )


@task(
    name="recommendations", cache_policy=NO_CACHE, retry_condition_fn=is_transient, result_serializer="json"
)
def recommend_task(scheduler: str, config: RunConfig, run_id: str) -> tuple[RecommendResult, StageReport]:
    """Each user's top-N unseen items of this run, the seen ones read from the run's own ingest."""
    return _run_stage(
        "recommendations",
        scheduler,
        lambda client: recommend_items(
            client,
            config.output,
            config.recommend,
            work_dir=config.work_location,
            source_run_id=run_id,
            block_size=config.block_size,
            run_id=run_id,
            device=config.device,
            publish=False,
        ),
    )


@task(name="ann", cache_policy=NO_CACHE, retry_condition_fn=is_transient, result_serializer="json")
def ann_task(scheduler: str, config: RunConfig, run_id: str) -> tuple[AnnResult, StageReport]:
    """An ANN index of this run's items (before the run's commit)."""
    return _run_stage(
        "ann",
        scheduler,
        lambda client: build_ann(
            client, config.output, config.ann, source_run_id=run_id, run_id=run_id, publish=False
        ),
    )


@task(name="publish", cache_policy=NO_CACHE, retry_condition_fn=is_transient, result_serializer="json")
def publish_task(
    output: str, tables: list[str], run_id: str, storage_options: dict[str, str] | None = None
) -> None:
    """The run's commit: every table's LATEST moves to the run, embeddings first, derived tables after."""
    publish_tables(output, tables, run_id, storage_options)


def training_key_settings(config: RunConfig) -> dict[str, Any]:
    """The run settings that can change trained factors (all but the operational ones)."""
    settings = config.model_dump(mode="json", exclude=set(OPERATIONAL_SETTINGS))
    init_from = settings.get("init_from")
    if init_from:
        # A warm start reads whatever tables are current there now.
        latest = [join(init_from, name, "LATEST") for name in list_names(init_from)]
        settings["init_from_runs"] = {
            location: read_bytes(location).decode().strip() for location in latest if exists(location)
        }
    return settings


def stage_options(config: RunConfig, stage: str, key: str) -> dict[str, Any]:
    """Task options of a cached stage: the run's retries, and a cache hit only if its stamp matches."""
    retry = {"retries": config.retries, "retry_delay_seconds": config.retry_delay_seconds}
    if not config.cache:
        return {**retry, "cache_policy": NO_CACHE}
    storage = result_storage(config.work_location)
    return {
        **retry,
        # Results live beside the work directory they describe: a cache
        # entry is never found on a host that cannot see those files.
        "result_storage": storage,
        "persist_result": True,
        # JSON, never pickle: these files are read back from disk on a cache hit.
        "result_serializer": "json",
        "refresh_cache": not (
            stamp_matches(config.work_location, stage, key) and stored_result_is_json(storage, key)
        ),
    }


# Prefect writes the exception of every failed task or flow run to its result
# storage (~/.prefect/storage by default), and reads it back when asked for
# the run's result; JSON keeps that from ever being an unpickling.
@flow(name="mf-dist-pipeline", validate_parameters=True, result_serializer="json")
def factorization_pipeline(config: RunConfig) -> PipelineSummary:
    """Ratings Parquet in, published embedding tables out; see the module docstring."""
    keep_our_errors_to_one_line()
    logger = get_run_logger()
    run_id = new_run_id()
    logger.info(
        "run %s: %s model, rank %d, input %s", run_id, config.model, config.resolved_rank, config.input
    )
    work_dir = config.work_location
    fingerprint = input_fingerprint(
        list_input_files(config.input, config.storage_options), config.storage_options
    )
    # One run at a time per output and work directory (see mf_dist.storage.output_lock);
    # taken first, so that an unwritable or busy output fails before any work.
    with (
        # Workers resolve URLs with these options (StorageOptionsPlugin), never from a record.
        storage_options_in_use((config.input, config.output, work_dir), config.storage_options),
        exclusive_run(
            config.output, work_dir, purpose=f"run {run_id}", storage_options=config.storage_options
        ),
        open_client(
            workers=config.workers,
            threads_per_worker=config.threads_per_worker,
            scheduler=config.scheduler,
            cluster=config.cluster,
        ) as client,
        storage_options_shared(client),
    ):
        for leftover in remove_debris(config.output):
            logger.info("removed %s, left by an interrupted run", leftover)
        scheduler = client.scheduler.address
        n_workers = len(client.scheduler_info(n_workers=-1)["workers"])
        logger.info("Dask scheduler %s with %d workers", scheduler, n_workers)

        place = work_dir if is_remote(work_dir) else str(Path(work_dir).resolve())
        key = stage_key("ingest", fingerprint, ingest_arguments(config), place)
        ingest, ingest_report = ingest_task.with_options(**stage_options(config, "ingest", key))(
            scheduler, config, key
        )
        reports = [ingest_report]
        if config.needs_cooccurrence:
            key = stage_key("cooccurrence", key)
            _, cooccurrence_report = cooccurrence_task.with_options(
                **stage_options(config, "cooccurrence", key)
            )(scheduler, config, ingest, key)
            reports.append(cooccurrence_report)
        key = stage_key("train", key, training_key_settings(config), n_workers)
        trained, train_report = train_task.with_options(**stage_options(config, "train", key))(
            scheduler, config, key
        )
        publish_loss_artifacts(trained.history, config.model, run_id, work_dir)
        evaluation: dict[str, float] = {}
        if ingest.n_held_out:
            evaluation = evaluate_task(scheduler, ingest, trained)
            logger.info("held-out evaluation: %s", ", ".join(f"{k} {v:.4g}" for k, v in evaluation.items()))
        exported, export_report = export_task.with_options(
            retries=config.retries, retry_delay_seconds=config.retry_delay_seconds
        )(scheduler, config, ingest, trained, run_id, evaluation)
        reports += [train_report, export_report]
        neighbors = None
        if config.neighbors:
            neighbors, neighbors_report = neighbors_task.with_options(
                retries=config.retries, retry_delay_seconds=config.retry_delay_seconds
            )(scheduler, config, run_id)
            reports.append(neighbors_report)
        recommendations = None
        if config.recommend:
            recommendations, recommend_report = recommend_task.with_options(
                retries=config.retries, retry_delay_seconds=config.retry_delay_seconds
            )(scheduler, config, run_id)
            reports.append(recommend_report)
        ann = None
        if config.ann != "none":
            ann, ann_report = ann_task.with_options(
                retries=config.retries, retry_delay_seconds=config.retry_delay_seconds
            )(scheduler, config, run_id)
            reports.append(ann_report)
        published = [table.name for table in exported.tables]
        derived = (("neighbors", neighbors), ("recommendations", recommendations), ("ann", ann))
        published += [name for name, done in derived if done]
        publish_task.with_options(retries=config.retries, retry_delay_seconds=config.retry_delay_seconds)(
            config.output, published, run_id, config.storage_options
        )
    return PipelineSummary(
        run_id=run_id,
        model=config.model,
        rank=config.resolved_rank,
        epochs=trained.epochs,
        output=config.output,
        device=trained.device,
        n_users=ingest.n_users,
        n_items=ingest.n_items,
        n_ratings=ingest.n_ratings,
        n_likes=ingest.n_likes,
        final_loss=trained.final_loss,
        final_metrics=trained.history[-1].metrics,
        loss_history=trained.history,
        evaluation=evaluation,
        export=exported,
        neighbors=neighbors,
        recommendations=recommendations,
        ann=ann,
        stages=reports,
    )
