"""Train stage: fit the configured model and solver on what the earlier stages wrote.

Reads the ingest (and, for X-based models, the co-occurrence) results from
the work directory, runs the epoch loop with per-epoch checkpoints under
``<work>/checkpoints/<model>/`` and writes the final factor blocks under
``<work>/train/<model>/``. ``resume`` continues from the last checkpoint;
``init_from`` starts from the tables a previous run published.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from distributed import Client, Future

from mf_dist.cluster import compute_device, training_resources
from mf_dist.config import TrainSettings
from mf_dist.cooccur import load_cooccurrence_result
from mf_dist.errors import ConfigError
from mf_dist.factor_files import EpochRecord, FactorTable, TrainResult
from mf_dist.ingest import IngestResult, load_ingest_result
from mf_dist.schema import TRAIN_DIR
from mf_dist.trainers.checkpoints import CheckpointStore, load_blocks, save_row_block
from mf_dist.trainers.cooccurrence import CooccurrenceGradient
from mf_dist.trainers.cooccurrence_als import CooccurrenceALS
from mf_dist.trainers.cooccurrence_weighted import CooccurrenceWeighted
from mf_dist.trainers.epoch_loop import ShardedModel, run_epochs
from mf_dist.trainers.explicit import ExplicitGradient
from mf_dist.trainers.explicit_als import ExplicitALS
from mf_dist.trainers.implicit import ImplicitModel
from mf_dist.trainers.liked_products import liked_products_if_cheaper
from mf_dist.trainers.nmf import build_nmf
from mf_dist.trainers.warm_start import align_published_table

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"

ModelFactory = Callable[
    [Client, Path, IngestResult, TrainSettings, dict[str, float] | None, dict[str, list[Future]] | None],
    ShardedModel,
]


def _cooccurrence_gradient(client, work_dir, ingest, settings, resources, initial):  # noqa: ANN001, ANN202
    cooccurrence = load_cooccurrence_result(work_dir)
    if settings.loss == "weighted":
        return CooccurrenceWeighted(client, cooccurrence, settings, resources, initial)
    liked = liked_products_if_cheaper(client, ingest, cooccurrence, settings, resources)
    return CooccurrenceGradient(client, cooccurrence, settings, resources, initial, liked=liked)


def _cooccurrence_als(client, work_dir, ingest, settings, resources, initial):  # noqa: ANN001, ANN202
    return CooccurrenceALS(client, load_cooccurrence_result(work_dir), settings, resources, initial)


def _ratings_model(cls: type) -> ModelFactory:
    def build(client, work_dir, ingest, settings, resources, initial):  # noqa: ANN001, ANN202
        return cls(client, ingest, settings, resources, initial)

    return build


# (model, solver) → how to build it. The loop and the stage never look inside.
MODELS: dict[tuple[str, str], ModelFactory] = {
    ("cooccurrence", "gradient"): _cooccurrence_gradient,
    ("cooccurrence", "als"): _cooccurrence_als,
    ("explicit", "gradient"): _ratings_model(ExplicitGradient),
    ("explicit", "als"): _ratings_model(ExplicitALS),
    ("implicit", "als"): _ratings_model(ImplicitModel),
    ("implicit", "gradient"): _ratings_model(ImplicitModel),
    ("nmf", "mu"): build_nmf,
    ("nmf", "gradient"): build_nmf,
}

# Which id map each published table's rows follow.
ID_MAPS = {
    "users": ("users_path", "user_id", 0),
    "items": ("items_path", "item_id", 1),
    # NMF of X = SᵀS: H's rows are items too.
    "contexts": ("items_path", "item_id", 2),
}


def _check(settings: TrainSettings, ingest: IngestResult) -> None:
    if settings.rank > ingest.n_items:
        raise ConfigError(
            f"rank {settings.rank} is larger than the number of items ({ingest.n_items}); lower --rank"
        )
    if settings.model == "explicit" and ingest.implicit:
        raise ConfigError(
            "the explicit model needs ratings, but the input files have no rating "
            "column; name it with --rating-col"
        )
    if (settings.model, settings.solver) not in MODELS:
        raise ConfigError(f"the {settings.model} model has no {settings.solver!r} solver in this version")


def _warm_start(
    client: Client,
    settings: TrainSettings,
    ingest: IngestResult,
    layouts: dict[str, FactorTable],
    directory: Path,
    resources: dict[str, float] | None,
) -> dict[str, list[Future]]:
    assert settings.init_from is not None
    initial: dict[str, list[Future]] = {}
    for name, layout in layouts.items():
        if name not in ID_MAPS:
            continue
        path_attribute, id_column, side = ID_MAPS[name]
        aligned = align_published_table(
            settings.init_from,
            layout.model_copy(update={"directory": str(directory / name)}),
            getattr(ingest, path_attribute),
            id_column,
            settings.seed,
            side,
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
    work_dir = Path(work_dir)
    ingest = load_ingest_result(work_dir)
    _check(settings, ingest)
    resources = training_resources(client)
    store = CheckpointStore(work_dir / CHECKPOINT_DIR / settings.model, settings)
    resumed = store.latest() if settings.resume else None
    if settings.resume and resumed is None:
        logger.info("--resume: no checkpoint under %s, starting from epoch 1", store.directory)
    if not settings.resume:
        store.clear()
    directory = work_dir / TRAIN_DIR / settings.model
    shutil.rmtree(directory, ignore_errors=True)

    initial: dict[str, list[Future]] | None = None
    if resumed is not None:
        initial = {table.name: load_blocks(client, table, resources) for table in resumed.tables}
    model = MODELS[settings.model, settings.solver](client, work_dir, ingest, settings, resources, initial)
    if resumed is None and settings.init_from:
        layouts = {name: layout for name, (layout, _) in model.factor_blocks().items()}
        warm = _warm_start(client, settings, ingest, layouts, work_dir / TRAIN_DIR / "warm_start", resources)
        model = MODELS[settings.model, settings.solver](client, work_dir, ingest, settings, resources, warm)

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
        table = layout.model_copy(update={"directory": str(directory / name)})
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
        global_mean=ingest.global_mean if settings.model == "explicit" else None,
        device=device,
    )


def _device_name(preference: str) -> str:
    return str(compute_device(preference))
