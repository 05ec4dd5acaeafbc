"""Fold-in: vectors for new (or changed) users against a published items table, on one machine.

A service that gets a user's ratings after the last run computes the user's
vector with the model's own exact row solve, the items held fixed: the ALS
user half-step of training (``explicit``: vector and bias with weighted-λ;
``implicit``: the confidence-weighted solve with YᵀY of all items). No Dask,
no work directory: the items table and a ratings frame are all it reads::

    from mf_dist import fold_in
    users = fold_in("out/items", frame)        # frame: user_id, item_id, rating
    users.ids, users.vectors, users.bias       # scores: users.vectors @ items.vectors.T (+ biases)

Which models have one is the registry's ``ModelSpec.fold_in``; ``nmf`` has
none (its multiplicative updates have no exact row solve).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mf_dist.errors import ConfigError, InputError
from mf_dist.registry import model_spec
from mf_dist.storage.reader import Embeddings, read_embeddings

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldedUsers:
    """User vectors computed by :func:`fold_in`, rows in ascending user id order."""

    ids: np.ndarray
    """(n,) the user ids that had at least one known item."""
    vectors: np.ndarray
    """(n, rank) float32."""
    bias: np.ndarray | None
    """(n,) float32 for the explicit model, else None."""
    unknown_items: int
    """Ratings skipped because their item is not in the items table."""
    users_without_items: int
    """Users left out because none of their items is in the table."""
    items_run_id: str
    """The run of the items table the vectors belong with."""


def fold_in(
    items: str | Path | Embeddings,
    ratings: pd.DataFrame,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    rating_col: str = "rating",
) -> FoldedUsers:
    """Vectors (and biases) of the users in ``ratings`` against the published ``items``.

    ``items`` is an output directory, an items table or run directory, or an
    :class:`Embeddings` already read. ``ratings`` has one row per (user, item);
    the rating column is needed by models that fit rating values (explicit)
    and used, when present, as r_ui by the others, which keep the liked rows
    only (rating at least the run's like threshold), as ingest does. Items
    not in the table are counted and skipped with a warning. The solve is in
    float64, the result float32. Raises :class:`ConfigError` for a model with
    no fold-in and :class:`InputError` for missing columns or duplicate pairs.
    """
    import pandas as pd
    import torch

    table = items if isinstance(items, Embeddings) else read_embeddings(items, "items")
    manifest = table.manifest
    spec = model_spec(manifest["model"])
    if spec.fold_in is None:
        raise ConfigError(f"the {spec.name} model has no fold-in (no exact user row solve)")
    frame = _checked_frame(ratings, user_col, item_col, rating_col, spec.needs_ratings)
    has_rating = rating_col in frame.columns
    like_threshold = (manifest.get("config") or {}).get("like_threshold")
    if spec.seen_items == "liked" and like_threshold is not None and has_rating:
        frame = frame[frame[rating_col] >= like_threshold]
    columns = table.ids.astype(object) if table.ids.dtype == object else table.ids
    positions = pd.Index(columns).get_indexer(frame[item_col].to_numpy())
    known = positions >= 0
    unknown = int((~known).sum())
    users_before = frame[user_col].nunique()
    if unknown:
        logger.warning("fold-in: %d ratings of items not in %s skipped", unknown, table.path)
    frame, positions = frame[known], positions[known]
    codes, user_ids = pd.factorize(frame[user_col], sort=True)
    order = np.lexsort((positions, codes))
    values = frame[rating_col].to_numpy(np.float64) if has_rating else np.ones(len(frame))
    hyperparameters: dict[str, Any] = manifest.get("hyperparameters") or {}
    vectors, bias = spec.fold_in_function()(
        torch.from_numpy(codes[order].astype(np.int64)),
        torch.from_numpy(positions[order].astype(np.int64)),
        torch.from_numpy(values[order]),
        len(user_ids),
        torch.from_numpy(table.vectors).double(),
        None if table.bias is None else torch.from_numpy(table.bias).double(),
        float(manifest.get("global_mean") or 0.0),
        hyperparameters,
    )
    return FoldedUsers(
        ids=np.asarray(user_ids),
        vectors=vectors.float().numpy(),
        bias=None if bias is None else bias.float().numpy(),
        unknown_items=unknown,
        users_without_items=int(users_before - len(user_ids)),
        items_run_id=manifest["run_id"],
    )


def _checked_frame(
    ratings: pd.DataFrame, user_col: str, item_col: str, rating_col: str, needs_rating: bool
) -> pd.DataFrame:
    required = [user_col, item_col] + ([rating_col] if needs_rating else [])
    missing = [column for column in required if column not in ratings.columns]
    if missing:
        raise InputError(
            f"ratings frame: no column {', '.join(missing)} (columns: {', '.join(map(str, ratings.columns))})"
        )
    duplicated = ratings.duplicated([user_col, item_col])
    if duplicated.any():
        first = ratings[duplicated].iloc[0]
        raise InputError(
            f"ratings frame: duplicate (user, item) pair ({first[user_col]!r}, {first[item_col]!r}); "
            "give one rating per pair"
        )
    return ratings
