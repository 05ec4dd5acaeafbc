"""Train stage: fit the configured model on what the earlier stages wrote.

Reads the ingest (and, for the co-occurrence model, the co-occurrence)
results from the work directory and writes factor blocks under
``<work>/train/<model>/``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from distributed import Client

from mf_dist.cluster import training_resources
from mf_dist.cooccur import load_cooccurrence_result
from mf_dist.errors import ConfigError
from mf_dist.factor_files import EpochRecord, TrainResult
from mf_dist.ingest import load_ingest_result
from mf_dist.schema import TRAIN_DIR
from mf_dist.trainers.cooccurrence import train_cooccurrence
from mf_dist.trainers.explicit import train_explicit


def train_factors(
    client: Client,
    work_dir: str | Path,
    *,
    model: str,
    rank: int,
    epochs: int,
    learning_rate: float,
    regularization: float,
    batch_size: int,
    seed: int,
    device: str = "auto",
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> TrainResult:
    """Train ``model`` on the ingested data in ``work_dir``; returns the loss history and factor paths."""
    ingest = load_ingest_result(work_dir)
    if rank > ingest.n_items:
        raise ConfigError(f"rank {rank} is larger than the number of items ({ingest.n_items}); lower --rank")
    directory = Path(work_dir) / TRAIN_DIR / model
    if directory.exists():
        shutil.rmtree(directory)
    resources = training_resources(client)
    if model == "cooccurrence":
        return train_cooccurrence(
            client,
            load_cooccurrence_result(work_dir),
            directory,
            rank=rank,
            epochs=epochs,
            learning_rate=learning_rate,
            seed=seed,
            device=device,
            resources=resources,
            on_epoch=on_epoch,
        )
    if model == "explicit":
        if ingest.implicit:
            raise ConfigError(
                "the explicit model needs ratings, but the input files have no rating "
                "column; name it with --rating-col"
            )
        return train_explicit(
            client,
            ingest,
            directory,
            rank=rank,
            epochs=epochs,
            learning_rate=learning_rate,
            regularization=regularization,
            batch_size=batch_size,
            seed=seed,
            device=device,
            resources=resources,
            on_epoch=on_epoch,
        )
    raise ConfigError(f"unknown model {model!r}; choose cooccurrence or explicit")
