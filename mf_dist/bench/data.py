"""Benchmark data: an ML-20M-shaped synthetic ratings set at three scales, and its prepared forms.

Every scale comes from :func:`mf_dist.bench.synthetic.synthetic_ratings` (heavy-tailed
item popularity p ∝ 1/(rank + 10)^0.9, at least 20 ratings per user, ratings
0.5–5 in halves from a low-rank model plus noise, no duplicate pairs) with a
fixed seed and :data:`~mf_dist.bench.scales.RATING_INTERCEPT`, so every run of a suite sees
the same data. "Liked" is rating ≥ 4 (35.5 % of ratings at ML-20M's shape).

The large co-occurrence embedding needs far more liked items than any scale
has (M = 100,000); :data:`MANY_ITEMS` generates, with the same generator and
seed, a set with that many liked items per scale (a few thousand at tiny).

Preparation (generating, filtering to the most liked items, ingesting) is
shared by both sides of a suite and is never part of a timed measurement.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mf_dist.bench.scales import DATA_SEED, LIKE_THRESHOLD, RATING_INTERCEPT, Scale
from mf_dist.bench.synthetic import GENERATOR_VERSION, synthetic_ratings, write_partitions
from mf_dist.runtime.cluster import open_client
from mf_dist.stages.ingest import ingest_ratings


def ratings_dir(cache_dir: Path, scale: Scale) -> Path:
    """Generate (once) the scale's ratings as Parquet files; later calls reuse them."""
    # The name carries the generator's settings: a cache made with others is not reused.
    directory = (
        cache_dir / scale.name / f"ratings-seed{DATA_SEED}-mu{RATING_INTERCEPT:g}-g{GENERATOR_VERSION}"
    )
    if not directory.exists():
        frame = synthetic_ratings(
            scale.n_ratings,
            n_users=scale.n_users,
            n_items=scale.n_items,
            intercept=RATING_INTERCEPT,
            seed=DATA_SEED,
        )
        partial = directory.with_name("ratings.partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_partitions(frame, partial, n_files=8)
        partial.rename(directory)
    return directory


def _write_most_liked(frame: pd.DataFrame, n_items: int, directory: Path) -> int:
    """Write the likes of the ``n_items`` most liked items of ``frame`` (ties by id) to ``directory``.

    Returns how many items were kept: ``n_items``, or fewer where fewer items have a like.
    """
    liked = frame[frame["rating"] >= LIKE_THRESHOLD]
    counts = liked["item_id"].value_counts()
    ranked = counts.sort_index().sort_values(ascending=False, kind="stable")
    keep = ranked.index[:n_items].to_numpy()
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_partitions(liked[np.isin(liked["item_id"].to_numpy(), keep)], partial, n_files=4)
    partial.rename(directory)
    return len(keep)


def most_liked_items_dir(cache_dir: Path, scale: Scale, n_items: int) -> Path:
    """The likes of the ``n_items`` most liked items only (ties by id), as Parquet.

    The suites that fit X restricted to popular items (``nmf``,
    ``cooccurrence-embedding``) ingest this, so both sides see the same X.
    """
    source = ratings_dir(cache_dir, scale)
    directory = cache_dir / scale.name / f"top{n_items}-of-{source.name}"
    if not directory.exists():
        _write_most_liked(pd.read_parquet(source), n_items, directory)
    return directory


@dataclass(frozen=True)
class ManyItems:
    """A ratings set with many liked items, for the large co-occurrence embedding (M × M too big to hold).

    ``n_item_ids`` item ids are generated so that at least ``n_liked_items``
    of them get a like despite the heavy tail (tail items are rated lower,
    so most of them never reach 4); the ``n_liked_items`` most liked are kept,
    so M is exactly ``n_liked_items``.
    """

    n_ratings: int
    n_users: int
    n_item_ids: int
    n_liked_items: int
    block_size: int


MANY_ITEMS: dict[str, ManyItems] = {
    # Seconds: M = 3,000 of ~3,900 liked items, X with ~0.3 M non-zeros.
    "tiny": ManyItems(60_000, 1_500, 8_000, 3_000, 1024),
    # M = 100,000 of ~129,000 liked items (1.6 M likes by ~98,000 users), generated once and
    # cached. ~80 ratings per user keeps the non-zeros of X = SᵀS in the tens of millions: they
    # grow with Σ_u likes_u², not with M. The block
    # size keeps the item grid at 13 blocks (91 tiles) rather than 49 (1,225 tiles to schedule).
    "small": ManyItems(8_000_000, 100_000, 300_000, 100_000, 8192),
    # The variant's size is the M = 100,000 at every full scale.
    "ml20m": ManyItems(8_000_000, 100_000, 300_000, 100_000, 8192),
}


def many_items_dir(cache_dir: Path, scale: Scale) -> tuple[Path, ManyItems]:
    """Generate (once) the scale's many-items likes as Parquet; returns the directory and its shape."""
    shape = MANY_ITEMS[scale.name]
    directory = cache_dir / scale.name / f"many-items-top{shape.n_liked_items}-g{GENERATOR_VERSION}"
    if not directory.exists():
        frame = synthetic_ratings(
            shape.n_ratings, n_users=shape.n_users, n_items=shape.n_item_ids, seed=DATA_SEED
        )
        kept = _write_most_liked(frame, shape.n_liked_items, directory)
        if kept < shape.n_liked_items:
            # The variant is defined by its M; a silently smaller one would mislabel the figures.
            shutil.rmtree(directory)
            raise RuntimeError(f"only {kept} items are liked, fewer than M = {shape.n_liked_items}")
    return directory, shape


def prepared_work_dir(
    cache_dir: Path, scale: Scale, input_dir: Path, *, holdout: float, workers: int
) -> Path:
    """Ingest ``input_dir`` (likes at rating ≥ 4, the scale's block size) into a fresh work directory.

    ``holdout`` > 0 keeps that share out by the pipeline's own hashed split;
    the reference side reads the same training and held-out blocks. Returns
    the work directory (its ingest summary: :func:`~mf_dist.stages.ingest.load_ingest_result`).
    """
    work_dir = cache_dir / scale.name / f"work-{input_dir.name}-holdout{holdout:g}"
    shutil.rmtree(work_dir, ignore_errors=True)
    with open_client(workers=workers) as client:
        ingest_ratings(
            client,
            str(input_dir),
            work_dir,
            like_threshold=LIKE_THRESHOLD,
            block_size=scale.block_size,
            holdout=holdout,
            seed=0,
        )
    return work_dir
