"""A published run with ``users`` and ``items`` tables and its work directory's ingest, all values chosen.

The recommendations stage reads both tables and ingest's rating blocks; this
writes the id maps, rating blocks and summary the way ingest does and the
factor blocks the way train does, then publishes through the real export
stage. :func:`brute_force_recommendations` is the numpy reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from distributed import Client

from mf_dist.blocks import BlockGrid
from mf_dist.stages.export import ExportResult, export_tables
from mf_dist.storage.factor_files import FactorTable, TrainResult, write_factor_block
from mf_dist.storage.ingested import IngestResult
from mf_dist.storage.publish import new_run_id
from mf_dist.storage.schema import INGEST_DIR, RATINGS_SCHEMA
from tests.support.published import HISTORY


@dataclass
class UserItemRun:
    """What was published: ids, vectors, biases, the training ratings (as table rows) and the mean."""

    user_ids: list
    item_ids: list
    users: np.ndarray
    items: np.ndarray
    user_bias: np.ndarray | None
    item_bias: np.ndarray | None
    global_mean: float
    ratings: pd.DataFrame  # user, item (table rows), rating
    work_dir: Path
    export: ExportResult


def _factor_table(name: str, directory: Path, vectors: np.ndarray, bias, block_size: int) -> FactorTable:
    table = FactorTable(
        name=name,
        directory=str(directory / name),
        n_rows=len(vectors),
        block_size=block_size,
        rank=vectors.shape[1],
        has_bias=bias is not None,
    )
    for block in range(table.grid.n_blocks):
        start, stop = table.grid.bounds(block)
        write_factor_block(table, block, vectors[start:stop], None if bias is None else bias[start:stop])
    return table


def publish_user_item_run(
    client: Client,
    output: Path,
    work_dir: Path,
    user_ids: list,
    item_ids: list,
    users: np.ndarray,
    items: np.ndarray,
    ratings: pd.DataFrame,
    *,
    model: str = "implicit",
    user_bias: np.ndarray | None = None,
    item_bias: np.ndarray | None = None,
    global_mean: float = 0.0,
    like_threshold: float | None = None,
    block_size: int = 8,
    hyperparameters: dict | None = None,
) -> UserItemRun:
    """Publish ``users``/``items`` under ``output`` and write ``work_dir``'s ingest of ``ratings``."""
    users = np.asarray(users, np.float32)
    items = np.asarray(items, np.float32)
    ingest_dir = work_dir / INGEST_DIR
    (ingest_dir / "ratings").mkdir(parents=True, exist_ok=True)

    def id_type(ids: list) -> pa.DataType:
        return pa.string() if isinstance(ids[0], str) else pa.int64()

    for name, ids, column in (("users", user_ids, "user_id"), ("items", item_ids, "item_id")):
        pq.write_table(
            pa.table(
                {
                    "index": pa.array(np.arange(len(ids), dtype=np.int32)),
                    column: pa.array(list(ids), type=id_type(ids)),
                }
            ),
            ingest_dir / f"{name}.parquet",
        )
    ingest = IngestResult(
        directory=str(ingest_dir),
        files=[],
        fingerprint="test-input",
        n_users=len(user_ids),
        n_items=len(item_ids),
        n_ratings=len(ratings),
        n_likes=len(ratings),
        block_size=block_size,
        implicit=model != "explicit",
        like_threshold=like_threshold,
        global_mean=global_mean,
        duplicates_policy="error",
        duplicates_resolved=0,
        user_column="user_id",
        item_column="item_id",
        user_id_type=str(id_type(user_ids)),
        item_id_type=str(id_type(item_ids)),
    )
    for block, start, stop in BlockGrid(len(user_ids), block_size):
        rows = ratings[(ratings.user >= start) & (ratings.user < stop)].sort_values(["user", "item"])
        pq.write_table(
            pa.Table.from_arrays(
                [
                    pa.array(rows.user.to_numpy(np.int32)),
                    pa.array(rows.item.to_numpy(np.int32)),
                    pa.array(rows.rating.to_numpy(np.float32)),
                ],
                schema=RATINGS_SCHEMA,
            ),
            ingest.ratings_path(block),
        )
    (ingest_dir / "summary.json").write_text(ingest.model_dump_json())
    factors = work_dir / "train" / model
    train = TrainResult(
        model=model,
        rank=users.shape[1],
        epochs=len(HISTORY),
        learning_rate=0.1,
        history=HISTORY,
        tables=[
            _factor_table("users", factors, users, user_bias, block_size),
            _factor_table("items", factors, items, item_bias, block_size),
        ],
        global_mean=global_mean if user_bias is not None else None,
        settings=hyperparameters or {},
        device="cpu",
    )
    export = export_tables(
        client,
        train,
        ingest,
        output,
        run_id=new_run_id(),
        config={"model": model, "holdout": 0.0, "like_threshold": like_threshold},
    )
    return UserItemRun(
        user_ids, item_ids, users, items, user_bias, item_bias, global_mean, ratings, work_dir, export
    )


def brute_force_scores(run: UserItemRun) -> np.ndarray:
    """The full users × items prediction in float64."""
    scores = run.users.astype(np.float64) @ run.items.astype(np.float64).T
    if run.user_bias is not None:
        scores += run.global_mean + run.user_bias[:, None] + run.item_bias[None, :]
    return scores


def brute_force_recommendations(run: UserItemRun, n: int, seen: pd.DataFrame | None) -> pd.DataFrame:
    """user_id, item_id, score, rank: each user's best n, ties by item id, ``seen`` pairs left out."""
    scores = brute_force_scores(run)
    if seen is not None:
        scores[seen.user.to_numpy(), seen.item.to_numpy()] = -np.inf
    id_order = np.argsort(np.argsort(np.asarray(run.item_ids), kind="stable"), kind="stable")
    rows = []
    for user in range(len(run.user_ids)):
        order = np.lexsort((id_order, -scores[user]))
        order = [item for item in order if np.isfinite(scores[user, item])][:n]
        rows += [
            (run.user_ids[user], run.item_ids[item], scores[user, item], rank)
            for rank, item in enumerate(order, start=1)
        ]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "score", "rank"])
