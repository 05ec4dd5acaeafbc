"""Realistic synthetic ratings: heavy-tailed popularity and activity, low-rank structure.

Item popularity follows p(rank) ∝ 1/(rank + 10)^0.9 over a random order of
item ids; users have at least ``min_user_ratings`` ratings plus a log-normal
share of the rest; no (user, item) pair repeats: each user's items are drawn
from the popularity law without replacement (:mod:`mf_dist.bench.distinct_items`).
Ratings come from μ + b_u + b_i + u*ᵀv* + noise with rank-``latent_rank``
factors, rounded to halves in 0.5..5 as in MovieLens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mf_dist.bench.distinct_items import distinct_items

GENERATOR_VERSION = 2
"""Bumped whenever the same arguments give other ratings; cached sets are named with it.
2: each user's items drawn without replacement user by user (was: rounds of draws and ``np.unique``)."""

SCORE_SLICE = 4_000_000


def synthetic_ratings(
    n_ratings: int = 1_000_000,
    *,
    n_users: int | None = None,
    n_items: int | None = None,
    latent_rank: int = 8,
    min_user_ratings: int = 20,
    popularity_exponent: float = 0.9,
    intercept: float = 3.6,
    seed: int = 0,
) -> pd.DataFrame:
    """A ratings frame (user_id int64, item_id int64, rating float32, timestamp int64).

    Defaults to about 80 ratings per user and 5·√n items. Exactly
    ``n_ratings`` rows unless the users cannot hold that many distinct items.
    ``intercept`` is μ, the score before biases, factors and noise: it sets
    the share of high ratings (3.6: about a quarter at 4 or more).
    """
    rng = np.random.default_rng(seed)
    n_users = n_users or max(10, n_ratings // 80)
    n_items = n_items or max(20, int(5 * n_ratings**0.5))
    min_user_ratings = min(min_user_ratings, n_ratings // n_users, n_items)

    popularity_rank = rng.permutation(n_items)
    popularity = 1.0 / (popularity_rank + 10.0) ** popularity_exponent
    popularity /= popularity.sum()

    extra = rng.lognormal(0.0, 1.2, n_users)
    extra *= (n_ratings - min_user_ratings * n_users) / extra.sum()
    counts = min_user_ratings + np.floor(extra).astype(np.int64)
    shortfall = n_ratings - int(counts.sum())
    counts += np.bincount(rng.integers(0, n_users, max(shortfall, 0)), minlength=n_users)
    counts = np.minimum(counts, max(1, n_items // 2))

    user, item = distinct_items(counts, popularity, seed=int(rng.integers(2**63)))

    user_factors = rng.normal(0, 1 / np.sqrt(latent_rank), (n_users, latent_rank))
    item_factors = rng.normal(0, 1 / np.sqrt(latent_rank), (n_items, latent_rank))
    user_bias = rng.normal(0, 0.35, n_users)
    # Popular items are rated a little higher, as in MovieLens.
    item_bias = rng.normal(0, 0.3, n_items) - 0.15 * np.log1p(popularity_rank / 100)
    rating = np.empty(len(user), dtype=np.float32)
    # In slices: two (ratings × rank) float64 gathers of the whole set would be 13 GB at 100 M ratings.
    for first in range(0, len(user), SCORE_SLICE):
        u, i = user[first : first + SCORE_SLICE], item[first : first + SCORE_SLICE]
        score = (
            intercept
            + user_bias[u]
            + item_bias[i]
            + 1.2 * np.einsum("ij,ij->i", user_factors[u], item_factors[i])
            + rng.normal(0, 0.5, len(u))
        )
        rating[first : first + len(u)] = np.clip(np.round(score * 2) / 2, 0.5, 5.0)
    start = 1_000_000_000 + rng.integers(0, 300_000_000, n_users)
    timestamp = start[user] + rng.integers(0, 50_000_000, len(user))
    order = rng.permutation(len(user))
    return pd.DataFrame(
        {
            "user_id": user[order],
            "item_id": item[order],
            "rating": rating[order],
            "timestamp": timestamp[order],
        }
    )


def write_partitions(ratings: pd.DataFrame, directory: str | Path, n_files: int = 8) -> list[Path]:
    """Write ``ratings`` as ``n_files`` Parquet files ``part-00000.parquet`` …"""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, chunk in enumerate(np.array_split(np.arange(len(ratings)), n_files)):
        path = directory / f"part-{index:05d}.parquet"
        pq.write_table(pa.Table.from_pandas(ratings.iloc[chunk], preserve_index=False), path)
        paths.append(path)
    return paths
