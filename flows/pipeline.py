"""The mf-dist pipeline as a Prefect flow: ingest → co-occurrence → train → export.

Each stage is a task that connects to the run's Dask cluster by address,
calls one stage function of :mod:`mf_dist` and reports its wall time and peak
memory. Run it with ``mf-dist run`` / ``mf-dist demo`` or call
:func:`factorization_pipeline` with a :class:`~mf_dist.config.RunConfig`;
no Prefect server needs to be started by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from distributed import Client
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from mf_dist.cluster import open_client
from mf_dist.config import RunConfig
from mf_dist.cooccur import CooccurrenceResult, cooccurrence_blocks
from mf_dist.export import ExportResult, export_tables, new_run_id
from mf_dist.factor_files import EpochRecord, TrainResult
from mf_dist.ingest import IngestResult, ingest_ratings
from mf_dist.memory_monitor import PeakMemoryMonitor
from mf_dist.train import train_factors

Result = TypeVar("Result")

MEBIBYTE = 1024 * 1024


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
    export: ExportResult
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


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_task(scheduler: str, config: RunConfig) -> tuple[IngestResult, StageReport]:
    return _run_stage(
        "ingest",
        scheduler,
        lambda client: ingest_ratings(
            client,
            config.input,
            config.resolved_work_dir,
            user_col=config.user_col,
            item_col=config.item_col,
            rating_col=config.rating_col,
            timestamp_col=config.timestamp_col,
            like_threshold=config.like_threshold,
            duplicates=config.duplicates,
            block_size=config.block_size,
        ),
    )


@task(name="cooccurrence", cache_policy=NO_CACHE)
def cooccurrence_task(
    scheduler: str, config: RunConfig, ingest: IngestResult
) -> tuple[CooccurrenceResult, StageReport]:
    return _run_stage(
        "cooccurrence",
        scheduler,
        lambda client: cooccurrence_blocks(client, ingest, config.resolved_work_dir),
    )


@task(name="train", cache_policy=NO_CACHE)
def train_task(scheduler: str, config: RunConfig) -> tuple[TrainResult, StageReport]:
    logger = get_run_logger()

    def log_epoch(record: EpochRecord) -> None:
        metrics = ", ".join(f"{name} {value:.4g}" for name, value in record.metrics.items())
        logger.info("epoch %d: loss %.6g %s", record.epoch, record.loss, f"({metrics})" if metrics else "")

    return _run_stage(
        "train",
        scheduler,
        lambda client: train_factors(
            client,
            config.resolved_work_dir,
            model=config.model,
            rank=config.rank,
            epochs=config.resolved_epochs,
            learning_rate=config.resolved_learning_rate,
            regularization=config.regularization,
            batch_size=config.batch_size,
            seed=config.seed,
            device=config.device,
            on_epoch=log_epoch,
        ),
    )


@task(name="export", cache_policy=NO_CACHE)
def export_task(
    scheduler: str, config: RunConfig, ingest: IngestResult, trained: TrainResult, run_id: str
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
        ),
    )


@flow(name="mf-dist-pipeline", validate_parameters=True)
def factorization_pipeline(config: RunConfig) -> PipelineSummary:
    """Ratings Parquet in, published embedding tables out; see the module docstring."""
    run_id = new_run_id()
    get_run_logger().info(
        "run %s: %s model, rank %d, input %s", run_id, config.model, config.rank, config.input
    )
    with open_client(
        workers=config.workers,
        threads_per_worker=config.threads_per_worker,
        scheduler=config.scheduler,
    ) as client:
        scheduler = client.scheduler.address
        ingest, ingest_report = ingest_task(scheduler, config)
        reports = [ingest_report]
        if config.model == "cooccurrence":
            _, cooccurrence_report = cooccurrence_task(scheduler, config, ingest)
            reports.append(cooccurrence_report)
        trained, train_report = train_task(scheduler, config)
        exported, export_report = export_task(scheduler, config, ingest, trained, run_id)
        reports += [train_report, export_report]
    return PipelineSummary(
        run_id=run_id,
        model=config.model,
        rank=config.rank,
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
        export=exported,
        stages=reports,
    )
