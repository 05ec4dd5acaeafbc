"""Quality of published tables on ratings they were not trained on.

These functions read the tables the way any downstream reader does
(:func:`mf_dist.reader.read_embeddings`) and apply the documented rules, so
what they measure is what a consumer of the tables gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mf_dist.errors import InputError
from mf_dist.reader import Embeddings, read_embeddings


@dataclass(frozen=True)
class RatingErrors:
    """Errors of r̂ = global_mean + b_u + b_i + u·v on held-out ratings."""

    rmse: float
    mae: float
    n_scored: int
    n_skipped: int
    """Held-out ratings whose user or item the tables do not know (no prediction)."""


def _positions(table: Embeddings, ids: pd.Series) -> np.ndarray:
    index = pd.Index(table.ids)
    return index.get_indexer(ids.to_numpy())


def explicit_rating_errors(
    output: str | Path,
    ratings: pd.DataFrame,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    rating_col: str = "rating",
) -> RatingErrors:
    """RMSE and MAE of the explicit model published under ``output`` on ``ratings``.

    ``ratings`` holds original ids and ratings (e.g. a held-out split); ratings
    of users or items unknown to the tables are counted in ``n_skipped``.
    """
    users = read_embeddings(output, "users")
    items = read_embeddings(output, "items")
    if users.bias is None or items.bias is None or "global_mean" not in items.manifest:
        raise InputError(f"{output}: not an explicit-model run (no biases or global_mean in the manifest)")
    user_rows = _positions(users, ratings[user_col])
    item_rows = _positions(items, ratings[item_col])
    known = (user_rows >= 0) & (item_rows >= 0)
    u, i = user_rows[known], item_rows[known]
    predicted = (
        items.manifest["global_mean"]
        + users.bias[u].astype(np.float64)
        + items.bias[i]
        + np.einsum("nk,nk->n", users.vectors[u].astype(np.float64), items.vectors[i])
    )
    error = predicted - ratings[rating_col].to_numpy()[known]
    return RatingErrors(
        rmse=float(np.sqrt(np.mean(error**2))) if len(error) else float("nan"),
        mae=float(np.mean(np.abs(error))) if len(error) else float("nan"),
        n_scored=int(known.sum()),
        n_skipped=int((~known).sum()),
    )


def random_split(frame: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held out): each row held out with probability ``fraction``, reproducibly for ``seed``."""
    held = np.random.default_rng(seed).random(len(frame)) < fraction
    return frame[~held].reset_index(drop=True), frame[held].reset_index(drop=True)
