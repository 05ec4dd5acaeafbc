"""The one scoring function of every side: against hand-computed figures and a plain dense reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from mf_dist.stages.scoring import ranking_metrics, rating_rmse


def dense_reference(scores: np.ndarray, seen: np.ndarray, relevant: np.ndarray, k: int):
    """Recall@k and NDCG@k by the definitions, one user at a time, in plain Python."""
    recalls, ndcgs, users = [], [], []
    for user in range(scores.shape[0]):
        wanted = {j for j in range(scores.shape[1]) if relevant[user, j]}
        if not wanted:
            continue
        candidates = [j for j in range(scores.shape[1]) if not seen[user, j]]
        # Highest score first; equal scores in item order.
        ranked = sorted(candidates, key=lambda j: (-scores[user, j], j))[:k]
        hits = [j in wanted for j in ranked]
        reachable = min(k, len(wanted))
        recalls.append(sum(hits) / reachable)
        dcg = sum(1 / math.log2(rank + 2) for rank, hit in enumerate(hits) if hit)
        ndcgs.append(dcg / sum(1 / math.log2(rank + 2) for rank in range(reachable)))
        users.append(user)
    return np.array(users), np.array(recalls), np.array(ndcgs)


def test_hand_computed_case():
    # One user, five items; item 0 is seen (excluded although it scores highest).
    scores = np.array([[9.0, 1.0, 5.0, 3.0, 4.0]])
    seen = sp.csr_matrix(np.array([[1, 0, 0, 0, 0]]))
    relevant = sp.csr_matrix(np.array([[0, 1, 0, 1, 0]]))
    # Top 2 of the unseen: items 2 (5.0), 4 (4.0): no hit. Top 3 adds item 3 (3.0): one hit at rank 3.
    assert ranking_metrics(scores, seen, relevant, k=2).recall.tolist() == [0.0]
    at_3 = ranking_metrics(scores, seen, relevant, k=3)
    assert at_3.recall.tolist() == [0.5]
    assert at_3.ndcg[0] == pytest.approx((1 / math.log2(4)) / (1 + 1 / math.log2(3)))


def test_ties_break_by_item_index():
    scores = np.zeros((1, 4))
    relevant = sp.csr_matrix(np.array([[0, 1, 0, 0]]))
    # All scores tie: the list is items 0, 1: item 1 is a hit at rank 2.
    metrics = ranking_metrics(scores, sp.csr_matrix((1, 4)), relevant, k=2)
    assert metrics.recall.tolist() == [1.0]
    assert metrics.ndcg[0] == pytest.approx(1 / math.log2(3))


@pytest.mark.parametrize("k", [1, 3, 10])
def test_matches_the_dense_reference(k):
    rng = np.random.default_rng(3)
    n_users, n_items = 40, 25
    # Rounded scores make ties, which both must break the same way.
    scores = np.round(rng.normal(size=(n_users, n_items)), 1)
    seen = rng.random((n_users, n_items)) < 0.3
    relevant = (rng.random((n_users, n_items)) < 0.15) & ~seen
    users, recall, ndcg = dense_reference(scores, seen, relevant, k)
    metrics = ranking_metrics(scores, sp.csr_matrix(seen), sp.csr_matrix(relevant), k)
    assert len(users) < n_users  # some users have nothing held out and are not scored
    np.testing.assert_array_equal(metrics.users, users)
    np.testing.assert_allclose(metrics.recall, recall, rtol=0, atol=1e-12)
    np.testing.assert_allclose(metrics.ndcg, ndcg, rtol=0, atol=1e-12)
    assert metrics.mean_recall == pytest.approx(recall.mean())


def test_rmse():
    assert rating_rmse(np.array([3.0, 4.0, 1.0]), np.array([4.0, 4.0, 3.0])) == pytest.approx(
        math.sqrt(5 / 3)
    )
    with pytest.raises(ValueError, match="differ in shape"):
        rating_rmse(np.zeros(2), np.zeros(3))
