"""Quality of published tables on ratings they were not trained on.

These functions read the tables the way any downstream reader does
(:func:`mf_dist.storage.reader.read_embeddings`) and apply the documented rules, so
what they measure is what a consumer of the tables gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from distributed import Client

from mf_dist.errors import InputError
from mf_dist.registry import model_spec
from mf_dist.stages.scoring import ranking_metrics
from mf_dist.storage.factor_files import FactorTable, TrainResult
from mf_dist.storage.ingested import IngestResult
from mf_dist.storage.reader import Embeddings, read_embeddings
from mf_dist.storage.store import read_table


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


# --- Held-out evaluation inside the pipeline, on the workers -----------------


def _read_table(table: FactorTable) -> tuple[np.ndarray, np.ndarray | None]:
    blocks = [table.read_block(b) for b in range(table.grid.n_blocks)]
    vectors = np.concatenate([v for v, _ in blocks]) if blocks else np.zeros((0, table.rank), np.float32)
    bias = np.concatenate([b for _, b in blocks]) if table.has_bias and blocks else None
    return vectors, bias


def explicit_block_errors(
    holdout_path: str, users: FactorTable, block: int, items: FactorTable, global_mean: float
) -> tuple[float, float, int]:
    """(Σ squared error, Σ absolute error, count) of one user block's held-out ratings (runs on a worker)."""
    held = read_table(holdout_path)
    if held.num_rows == 0:
        return 0.0, 0.0, 0
    start = users.grid.bounds(block)[0]
    user_vectors, user_bias = users.read_block(block)
    item_vectors, item_bias = _read_table(items)
    assert user_bias is not None and item_bias is not None
    u = held["user"].to_numpy() - start
    i = held["item"].to_numpy()
    predicted = (
        global_mean
        + user_bias[u].astype(np.float64)
        + item_bias[i]
        + np.einsum("nk,nk->n", user_vectors[u].astype(np.float64), item_vectors[i])
    )
    error = predicted - held["rating"].to_numpy()
    return float((error**2).sum()), float(np.abs(error).sum()), len(error)


def _liked(path: str, like_threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
    table = read_table(path)
    users, items, ratings = (table[c].to_numpy() for c in ("user", "item", "rating"))
    keep = np.ones(len(users), bool) if like_threshold is None else ratings >= like_threshold
    return users[keep], items[keep]


def _marks(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """A 0/1 CSR matrix with ones at (rows, cols) (repeated pairs count once)."""
    marks = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=shape)
    marks.data[:] = 1.0
    return marks


def ranking_block_metrics(
    holdout_path: str,
    ratings_path: str,
    user_start: int,
    n_users: int,
    like_threshold: float | None,
    users: FactorTable | None,
    block: int,
    profile_items: FactorTable,
    candidates: FactorTable,
    k: int,
) -> tuple[float, float, int]:
    """(Σ recall@k, Σ NDCG@k, users scored) for one user block's held-out likes (runs on a worker).

    A user's vector is its row of ``users`` when the model has one, else the
    sum of the ``profile_items`` vectors of the items it liked in training.
    Items liked in training are never recommended again. The scores are
    :func:`mf_dist.stages.scoring.ranking_metrics`, the function the quality
    bench scores every side with.
    """
    held_users, held_items = _liked(holdout_path, like_threshold)
    if len(held_users) == 0:
        return 0.0, 0.0, 0
    train_users, train_items = _liked(ratings_path, like_threshold)
    candidate_vectors = torch.from_numpy(_read_table(candidates)[0]).double()
    if users is not None:
        user_vectors = torch.from_numpy(users.read_block(block)[0]).double()
    else:
        profile = torch.from_numpy(_read_table(profile_items)[0]).double()
        user_vectors = torch.zeros(n_users, profile.shape[1], dtype=torch.float64)
        user_vectors.index_add_(0, torch.from_numpy(train_users - user_start), profile[train_items])
    recall_sum = ndcg_sum = 0.0
    scored_users = np.unique(held_users)
    n_candidates = len(candidate_vectors)
    for chunk in np.array_split(scored_users, max(1, len(scored_users) // 256)):
        local = torch.from_numpy(chunk - user_start)
        scores = (user_vectors[local] @ candidate_vectors.T).numpy()
        seen = np.isin(train_users, chunk)
        held = np.isin(held_users, chunk)
        metrics = ranking_metrics(
            scores,
            _marks(np.searchsorted(chunk, train_users[seen]), train_items[seen], (len(chunk), n_candidates)),
            _marks(np.searchsorted(chunk, held_users[held]), held_items[held], (len(chunk), n_candidates)),
            k,
        )
        recall_sum += float(metrics.recall.sum())
        ndcg_sum += float(metrics.ndcg.sum())
    return recall_sum, ndcg_sum, len(scored_users)


def holdout_metrics(
    client: Client, ingest: IngestResult, trained: TrainResult, k: int = 10
) -> dict[str, float]:
    """Held-out metrics of a trained model, by its registered metric.

    RMSE and MAE of the predicted ratings (``rating_errors``), or recall@k and
    NDCG@k of the held-out likes (``ranking``).
    """
    if ingest.n_held_out == 0:
        return {}
    tables = {t.name: t for t in trained.tables}
    grid = ingest.user_grid
    if model_spec(trained.model).holdout_metric == "rating_errors":
        sums = client.gather(
            [
                client.submit(
                    explicit_block_errors,
                    str(ingest.holdout_path(b)),
                    tables["users"],
                    b,
                    tables["items"],
                    ingest.global_mean,
                    pure=False,
                )
                for b in range(grid.n_blocks)
            ]
        )
        n = max(1, sum(s[2] for s in sums))
        return {
            "holdout_rmse": float(np.sqrt(sum(s[0] for s in sums) / n)),
            "holdout_mae": sum(s[1] for s in sums) / n,
            "holdout_ratings": float(n),
        }
    users = tables.get("users") if "contexts" not in tables else None
    candidates = tables["contexts"] if "contexts" in tables else tables["items"]
    sums = client.gather(
        [
            client.submit(
                ranking_block_metrics,
                str(ingest.holdout_path(b)),
                str(ingest.ratings_path(b)),
                start,
                stop - start,
                ingest.like_threshold,
                users,
                b,
                tables["items"],
                candidates,
                k,
                pure=False,
            )
            for b, start, stop in grid
        ]
    )
    n = max(1, sum(s[2] for s in sums))
    return {
        f"holdout_recall@{k}": sum(s[0] for s in sums) / n,
        f"holdout_ndcg@{k}": sum(s[1] for s in sums) / n,
        "holdout_users": float(n),
    }
