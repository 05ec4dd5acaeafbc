"""The factories the registry names: each builds one model × solver trainer from the work directory."""

from __future__ import annotations

from pathlib import Path

from distributed import Client, Future

from mf_dist.settings import TrainSettings
from mf_dist.storage.ingested import IngestResult
from mf_dist.storage.tiles import load_cooccurrence_result
from mf_dist.trainers.cooccurrence import CooccurrenceGradient
from mf_dist.trainers.cooccurrence_als import CooccurrenceALS
from mf_dist.trainers.cooccurrence_weighted import CooccurrenceWeighted
from mf_dist.trainers.epoch_loop import ShardedModel
from mf_dist.trainers.explicit import ExplicitGradient
from mf_dist.trainers.explicit_als import ExplicitALS
from mf_dist.trainers.implicit import ImplicitModel
from mf_dist.trainers.liked_products import liked_products_if_cheaper
from mf_dist.trainers.nmf import build_nmf

Resources = dict[str, float] | None
Initial = dict[str, list[Future]] | None


def cooccurrence_gradient(
    client: Client,
    work_dir: Path,
    ingest: IngestResult,
    settings: TrainSettings,
    resources: Resources,
    initial: Initial,
) -> ShardedModel:
    cooccurrence = load_cooccurrence_result(work_dir)
    if settings.loss == "weighted":
        return CooccurrenceWeighted(client, cooccurrence, settings, resources, initial)
    liked = liked_products_if_cheaper(client, ingest, cooccurrence, settings, resources)
    return CooccurrenceGradient(client, cooccurrence, settings, resources, initial, liked=liked)


def cooccurrence_als(
    client: Client,
    work_dir: Path,
    ingest: IngestResult,
    settings: TrainSettings,
    resources: Resources,
    initial: Initial,
) -> ShardedModel:
    return CooccurrenceALS(client, load_cooccurrence_result(work_dir), settings, resources, initial)


def explicit_als(
    client: Client,
    work_dir: Path,
    ingest: IngestResult,
    settings: TrainSettings,
    resources: Resources,
    initial: Initial,
) -> ShardedModel:
    return ExplicitALS(client, ingest, settings, resources, initial)


def explicit_gradient(
    client: Client,
    work_dir: Path,
    ingest: IngestResult,
    settings: TrainSettings,
    resources: Resources,
    initial: Initial,
) -> ShardedModel:
    return ExplicitGradient(client, ingest, settings, resources, initial)


def implicit(
    client: Client,
    work_dir: Path,
    ingest: IngestResult,
    settings: TrainSettings,
    resources: Resources,
    initial: Initial,
) -> ShardedModel:
    return ImplicitModel(client, ingest, settings, resources, initial)


nmf = build_nmf
