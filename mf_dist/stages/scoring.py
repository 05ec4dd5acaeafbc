"""The held-out scores every side of a comparison is measured with: one function per metric.

These take plain arrays (a score matrix, predicted ratings), never our tables,
so our models, the reference libraries and the baselines go through exactly
the same arithmetic: :func:`ranking_metrics` for recall@k and NDCG@k of
held-out likes, :func:`rating_rmse` for predicted ratings. The pipeline's own
held-out evaluation (:mod:`mf_dist.stages.evaluation`) calls them too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class RankingMetrics:
    """Per-user recall@k and NDCG@k of the users that have held-out relevant items.

    ``users`` are row positions in the score matrix; ``recall`` and ``ndcg``
    (float64, one value each in [0, 1]) are aligned with it.
    """

    users: np.ndarray
    recall: np.ndarray
    ndcg: np.ndarray

    @property
    def mean_recall(self) -> float:
        return float(self.recall.mean()) if len(self.recall) else float("nan")

    @property
    def mean_ndcg(self) -> float:
        return float(self.ndcg.mean()) if len(self.ndcg) else float("nan")


def ranking_metrics(
    scores: np.ndarray, seen: sp.spmatrix, relevant: sp.spmatrix, k: int = 10
) -> RankingMetrics:
    """Recall@k and NDCG@k of each user's top-k unseen items against its held-out relevant items.

    ``scores`` is (m users × n items), higher is better; ``seen`` and
    ``relevant`` are (m × n) sparse matrices whose nonzero entries mark a
    user's training items (never recommended: their score becomes −∞) and its
    held-out relevant items (binary relevance; values are ignored). Users with
    no relevant item are not scored. Ties are broken by the lower item index
    (a stable sort), so a side whose scores tie (popularity, item-kNN) gets
    the same list on every run.

    recall@k = hits / min(k, |relevant|) (1 when every slot that could hold a
    relevant item does); NDCG@k = Σ_hits 1/log2(rank + 1) over the ideal
    Σ_{r ≤ min(k, |relevant|)} 1/log2(r + 1), ranks counted from 1.
    """
    scores = np.array(scores, dtype=np.float64, copy=True)
    n_items = scores.shape[1]
    if seen.shape != scores.shape or relevant.shape != scores.shape:
        raise ValueError(
            f"scores {scores.shape}, seen {seen.shape}, relevant {relevant.shape} differ in shape"
        )
    seen = sp.csr_matrix(seen)
    relevant = sp.csr_matrix(relevant)
    relevant.eliminate_zeros()
    seen_rows, seen_cols = seen.nonzero()
    scores[seen_rows, seen_cols] = -np.inf
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    k = min(k, n_items)
    discounts = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    ideal = np.cumsum(discounts)
    # A stable sort of −score keeps equal scores in item order.
    top = np.argsort(-scores[users], axis=1, kind="stable")[:, :k]
    recall = np.empty(len(users))
    ndcg = np.empty(len(users))
    for row, user in enumerate(users):
        wanted = relevant.indices[relevant.indptr[user] : relevant.indptr[user + 1]]
        hits = np.isin(top[row], wanted)
        reachable = min(k, len(wanted))
        recall[row] = hits.sum() / reachable
        ndcg[row] = discounts[hits].sum() / ideal[reachable - 1]
    return RankingMetrics(users=users, recall=recall, ndcg=ndcg)


def rating_rmse(predicted: np.ndarray, actual: np.ndarray) -> float:
    """√(mean((predicted − actual)²)) in float64, over aligned 1-d arrays of ratings (NaN when empty)."""
    predicted = np.asarray(predicted, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if predicted.shape != actual.shape:
        raise ValueError(f"predicted {predicted.shape} and actual {actual.shape} ratings differ in shape")
    return float(np.sqrt(np.mean((predicted - actual) ** 2))) if len(actual) else float("nan")
