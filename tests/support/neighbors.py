"""The neighbours table against a brute-force reference."""

from __future__ import annotations

import numpy as np

from mf_dist.storage.reader import read_published


def brute_force(vectors: np.ndarray, metric: str) -> np.ndarray:
    """The full (n × n) similarity in float64, the item itself at −inf."""
    v = vectors.astype(np.float64)
    if metric == "cosine":
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        v = v / np.maximum(norms, 1e-12)
    scores = v @ v.T
    np.fill_diagonal(scores, -np.inf)
    return scores


def assert_matches_brute_force(output, ids, vectors, metric, k, tolerance=1e-5):
    """Scores equal brute force rank by rank; where a score is clear of its neighbours, so is the id.

    Tied scores may come in any order, so their ids are compared as sets.
    """
    table, manifest, _ = read_published(output, "neighbors")
    assert manifest["k"] == k
    assert table.num_rows == len(ids) * k
    frame = table.to_pandas()
    assert (frame.groupby("item_id")["rank"].apply(list) == [list(range(1, k + 1))] * len(ids)).all()
    assert (frame.item_id != frame.neighbor_id).all()
    position = {item: row for row, item in enumerate(ids)}
    exact = brute_force(vectors, metric)
    for item, rows in frame.groupby("item_id", sort=False):
        scores = exact[position[item]]
        expected_order = np.argsort(-scores, kind="stable")[:k]
        got_scores = rows.score.to_numpy()
        np.testing.assert_allclose(got_scores, scores[expected_order], rtol=tolerance, atol=tolerance)
        got_ids = rows.neighbor_id.tolist()
        kth = scores[expected_order[-1]]
        # Every item clearly better than the k-th must be there, in its place when clear of ties.
        clearly_in = {ids[j] for j in np.flatnonzero(scores > kth + tolerance)}
        assert clearly_in <= set(got_ids)
        for rank, j in enumerate(expected_order):
            others = np.delete(scores, j)
            if np.min(np.abs(others - scores[j])) > tolerance:
                assert got_ids[rank] == ids[j], (item, rank)
