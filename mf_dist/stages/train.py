"""Train stage: fit the configured model and solver on what the earlier stages wrote.

Reads the ingest (and, for X-based models, the co-occurrence) results from
the work directory, runs the epoch loop with per-epoch checkpoints under
``<work>/checkpoints/<model>/`` and writes the final factor blocks under
``<work>/train/<model>/``. ``resume`` continues from the last checkpoint;
``init_from`` starts from the tables a previous run published.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from distributed import Client, Future

from mf_dist.errors import ConfigError
from mf_dist.registry import TABLE_ID_MAPS, model_spec
from mf_dist.runtime.cluster import compute_device, training_resources
from mf_dist.settings import TrainSettings
from mf_dist.storage.checkpoints import CheckpointStore, load_blocks, save_row_block
from mf_dist.storage.factor_files import EpochRecord, FactorTable, TrainResult
from mf_dist.storage.ingested import IngestResult, load_ingest_result
from mf_dist.storage.schema import TRAIN_DIR
from mf_dist.storage.store import delete_prefix, join
from mf_dist.storage.warm_start import align_published_table
from mf_dist.trainers.epoch_loop import run_epochs

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


def _check(settings: TrainSettings, ingest: IngestResult) -> None:
    if settings.rank > ingest.n_items:
        raise ConfigError(
            f"rank {settings.rank} is larger than the number of items ({ingest.n_items}); lower --rank"
        )
    spec = model_spec(settings.model)
    if spec.needs_ratings and ingest.implicit:
        raise ConfigError(
            f"the {spec.name} model needs ratings, but the input files have no rating "
            "column; name it with --rating-col"
        )
    if settings.solver not in spec.solvers:
        raise ConfigError(f"the {settings.model} model has no {settings.solver!r} solver in this version")


def _warm_start(
    client: Client,
    settings: TrainSettings,
    ingest: IngestResult,
    layouts: dict[str, FactorTable],
    directory: str,
    resources: dict[str, float] | None,
) -> dict[str, list[Future]]:
    assert settings.init_from is not None
    initial: dict[str, list[Future]] = {}
    for name, layout in layouts.items():
        if name not in TABLE_ID_MAPS:
            continue
        id_map = TABLE_ID_MAPS[name]
        aligned = align_published_table(
            settings.init_from,
            layout.model_copy(update={"directory": join(directory, name)}),
            getattr(ingest, id_map.path_attribute),
            id_map.id_column,
            settings.seed,
            id_map.side,
        )
        if aligned is None:
            logger.info("--init-from %s has no %s table: %s start fresh", settings.init_from, name, name)
            continue
        table, matched = aligned
        logger.info("warm start: %d of %d %s matched by id", matched, layout.n_rows, name)
        initial[name] = load_blocks(client, table, resources)
    if not initial:
        raise ConfigError(f"--init-from {settings.init_from}: no published table of this model found there")
    return initial


def train_factors(
    client: Client,
    work_dir: str | Path,
    settings: TrainSettings,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> TrainResult:
    """Train ``settings.model`` with ``settings.solver``; returns the loss history and factor tables."""
    work_dir = str(work_dir)
    ingest = load_ingest_result(work_dir)
    _check(settings, ingest)
    resources = training_resources(client)
    store = CheckpointStore(join(work_dir, CHECKPOINT_DIR, settings.model), settings)
    resumed = store.latest() if settings.resume else None
    if settings.resume and resumed is None:
        logger.info("--resume: no checkpoint under %s, starting from epoch 1", store.directory)
    if not settings.resume:
        store.clear()
    directory = join(work_dir, TRAIN_DIR, settings.model)
    delete_prefix(directory)

    initial: dict[str, list[Future]] | None = None
    if resumed is not None:
        initial = {table.name: load_blocks(client, table, resources) for table in resumed.tables}
    build = model_spec(settings.model).solvers[settings.solver].factory()
    model = build(client, work_dir, ingest, settings, resources, initial)
    if resumed is None and settings.init_from:
        layouts = {name: layout for name, (layout, _) in model.factor_blocks().items()}
        warm = _warm_start(
            client, settings, ingest, layouts, join(work_dir, TRAIN_DIR, "warm_start"), resources
        )
        model = build(client, work_dir, ingest, settings, resources, warm)

    outcome = run_epochs(
        client,
        model,
        epochs=settings.epochs,
        tolerance=settings.tolerance,
        store=store,
        resumed=resumed,
        on_epoch=on_epoch,
        objective_name=f"{settings.model} loss",
    )
    tables = []
    saves = []
    for name, (layout, blocks) in model.factor_blocks().items():
        table = layout.model_copy(update={"directory": join(directory, name)})
        tables.append(table)
        saves += [client.submit(save_row_block, table, b, rows) for b, rows in enumerate(blocks)]
    client.gather(saves)
    device = client.submit(_device_name, settings.device, resources=resources, pure=False).result()
    return TrainResult(
        model=settings.model,
        solver=settings.solver,
        rank=settings.rank,
        epochs=outcome.epochs_run,
        stopped_early=outcome.stopped_early,
        learning_rate=settings.learning_rate,
        settings=settings.model_dump(mode="json"),
        history=outcome.history,
        tables=tables,
        global_mean=ingest.global_mean if model_spec(settings.model).has_global_mean else None,
        device=device,
    )


def _device_name(preference: str) -> str:
    return str(compute_device(preference))
