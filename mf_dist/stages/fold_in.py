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

:func:`publish_folded_users` (``mf-dist fold-in``) publishes the result as a
new run of the ``users`` table: the base run's users kept, the folded ones
replaced in place or appended, the manifest naming the base run
(``fold_in.base_run_id``) and the items run the vectors go with
(``items_run_id``).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mf_dist.errors import ConfigError, InputError, OutputError
from mf_dist.registry import model_spec
from mf_dist.storage.publish import new_run_id, publish_run, staged_run, write_manifest
from mf_dist.storage.reader import Embeddings, find_run, read_embeddings, read_manifest
from mf_dist.storage.schema import embedding_table_schema
from mf_dist.storage.store import join, write_table

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

# Fewer users than this per thread are solved on one: a thread's start costs more than it saves.
MIN_USERS_PER_THREAD = 256


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
    solve = spec.fold_in_function()
    item_vectors = torch.from_numpy(table.vectors).double()
    item_bias = None if table.bias is None else torch.from_numpy(table.bias).double()
    rows, cols, values = codes[order].astype(np.int64), positions[order].astype(np.int64), values[order]

    def solve_users(first: int, last: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Users ``first .. last`` (codes), whose entries are a slice: ``rows`` is sorted."""
        start, stop = np.searchsorted(rows, [first, last])
        return solve(
            torch.from_numpy(rows[start:stop] - first),
            torch.from_numpy(cols[start:stop]),
            torch.from_numpy(values[start:stop]),
            last - first,
            item_vectors,
            item_bias,
            float(manifest.get("global_mean") or 0.0),
            hyperparameters,
        )

    # The row solves are independent and the compiled loop releases the GIL: one contiguous
    # share of the users per torch thread.
    threads = max(1, min(torch.get_num_threads(), len(user_ids) // MIN_USERS_PER_THREAD))
    bounds = np.linspace(0, len(user_ids), threads + 1).astype(int)
    if threads == 1:
        parts = [solve_users(0, len(user_ids))]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(solve_users, bounds[:-1], bounds[1:]))
    vectors = torch.cat([part[0] for part in parts])
    bias = None if parts[0][1] is None else torch.cat([part[1] for part in parts])
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


@dataclass(frozen=True)
class FoldInResult:
    """What :func:`publish_folded_users` published."""

    run_id: str
    path: str
    rows: int
    users_replaced: int
    users_added: int
    unknown_items: int
    base_run_id: str
    items_run_id: str


def publish_folded_users(
    output: str | Path,
    ratings: pd.DataFrame,
    *,
    input_description: str = "",
    run_id: str | None = None,
) -> FoldInResult:
    """Fold the users of ``ratings`` in against the current ``items`` run and publish a new ``users`` run.

    The base is the current ``users`` run, which must belong to the current
    ``items`` run (the same run, or a fold-in of it). Users already in it get
    their new vectors in place; new ones are appended. The rating columns are
    the base run's (its config's ``user_col``, ``item_col``, ``rating_col``).
    ``output`` may be a URL (``s3://bucket/out``): the run is then written
    under ``users/runs/<run_id>/``, manifest last, and ``LATEST`` put after.
    """
    import pyarrow as pa

    base_dir = find_run(output, "users")
    base_manifest = read_manifest(base_dir)
    items = read_embeddings(output, "items")
    items_run_id = items.manifest["run_id"]
    if base_manifest.get("items_run_id", base_manifest["run_id"]) != items_run_id:
        raise OutputError(
            f"{base_dir}: users run {base_manifest['run_id']} does not belong to the current items run "
            f"{items_run_id}; fold in against the run the users were trained with"
        )
    config = base_manifest.get("config") or {}
    folded = fold_in(
        items,
        ratings,
        user_col=config.get("user_col", "user_id"),
        item_col=config.get("item_col", "item_id"),
        rating_col=config.get("rating_col", "rating"),
    )
    base = read_embeddings(base_dir, "users")
    id_type = pa.type_for_alias(base_manifest["id_type"])
    base_ids = pd_index(base.ids)
    where = base_ids.get_indexer(folded.ids)
    replaced, added = where >= 0, where < 0
    vectors = base.vectors.copy()
    vectors[where[replaced]] = folded.vectors[replaced]
    vectors = np.concatenate([vectors, folded.vectors[added]])
    bias = None
    if base.bias is not None:
        assert folded.bias is not None
        bias = base.bias.copy()
        bias[where[replaced]] = folded.bias[replaced]
        bias = np.concatenate([bias, folded.bias[added]])
    ids = pa.concat_arrays(
        [pa.array(base.ids, type=id_type), pa.array(folded.ids[added].tolist(), type=id_type)]
    )
    rank = vectors.shape[1]
    schema = embedding_table_schema("user_id", id_type, rank, bias is not None)
    columns = [ids, pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), rank)]
    if bias is not None:
        columns.append(pa.array(bias))
    run_id = run_id or new_run_id()
    table_dir = join(str(output), "users")
    with staged_run(table_dir, run_id, "the users table") as partial:
        name = "part-00000.parquet"
        table = pa.Table.from_arrays(columns, schema=schema)
        write_table(table, join(str(partial), name), durable=True, row_group_size=max(1, table.num_rows))
        manifest = {
            **base_manifest,
            "run_id": run_id,
            "row_count": table.num_rows,
            "files": [{"name": name, "rows": table.num_rows}],
            "items_run_id": items_run_id,
            # The vectors of folded users come from no training input of this run's.
            "input_fingerprint": None,
            "fold_in": {
                "base_run_id": base_manifest["run_id"],
                "input": input_description,
                "users_replaced": int(replaced.sum()),
                "users_added": int(added.sum()),
                "unknown_items": folded.unknown_items,
                "users_without_items": folded.users_without_items,
            },
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
        }
        manifest.pop("loss_curve", None)
        write_manifest(partial, manifest)
    publish_run(table_dir, run_id)
    return FoldInResult(
        run_id=run_id,
        path=join(table_dir, "runs", run_id),
        rows=table.num_rows,
        users_replaced=int(replaced.sum()),
        users_added=int(added.sum()),
        unknown_items=folded.unknown_items,
        base_run_id=base_manifest["run_id"],
        items_run_id=items_run_id,
    )


def pd_index(ids: np.ndarray) -> pd.Index:
    import pandas as pd

    return pd.Index(ids)
