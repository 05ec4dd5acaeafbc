"""Realistic synthetic ratings: heavy-tailed popularity and activity, low-rank structure.

Item popularity follows p(rank) ∝ 1/(rank + 10)^0.9 over a random order of
item ids; users have at least ``min_user_ratings`` ratings plus a log-normal
share of the rest; no (user, item) pair repeats. Ratings come from
μ + b_u + b_i + u*ᵀv* + noise with rank-``latent_rank`` factors, rounded to
halves in 0.5..5 as in MovieLens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


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

    keys = np.empty(0, dtype=np.int64)
    need = counts
    for _ in range(200):
        if not need.any():
            break
        users = np.repeat(np.arange(n_users, dtype=np.int64), need)
        items = rng.choice(n_items, size=len(users), p=popularity)
        keys = np.unique(np.concatenate([keys, users * n_items + items]))
        need = counts - np.bincount(keys // n_items, minlength=n_users)
    user, item = keys // n_items, keys % n_items

    user_factors = rng.normal(0, 1 / np.sqrt(latent_rank), (n_users, latent_rank))
    item_factors = rng.normal(0, 1 / np.sqrt(latent_rank), (n_items, latent_rank))
    user_bias = rng.normal(0, 0.35, n_users)
    # Popular items are rated a little higher, as in MovieLens.
    item_bias = rng.normal(0, 0.3, n_items) - 0.15 * np.log1p(popularity_rank / 100)
    score = (
        intercept
        + user_bias[user]
        + item_bias[item]
        + 1.2 * (user_factors[user] * item_factors[item]).sum(axis=1)
        + rng.normal(0, 0.5, len(user))
    )
    rating = np.clip(np.round(score * 2) / 2, 0.5, 5.0).astype(np.float32)
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
