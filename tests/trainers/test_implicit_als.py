"""The distributed implicit ALS trainer against a dense Hu–Koren–Volinsky epoch written out in numpy.

From a fixed start (U₀, V₀), one epoch of the trainer is the user half-step
x_u = (Vᵀ C_u V + λI)⁻¹ Vᵀ C_u p_u for every user, then the item half-step
y_i = (Uᵀ C_i U + λI)⁻¹ Uᵀ C_i p_i with the new users: c = 1 + α r on the
liked entries (ratings ≥ the like threshold, r the rating; 1 + α or
1 + α log(1 + r/ε) with the other confidence modes) and 1 elsewhere,
p = 1 on the liked entries and 0 elsewhere; λ is added once per row, unscaled
by its count (mf_dist/models/implicit.py). The reference builds the dense
users × items matrices from the raw ratings and the ingest id maps, and solves
every row with numpy in float64; the trainer runs on a two-process cluster in
float32 with blocks and row pieces of both sides.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from mf_dist.registry import MODELS
from mf_dist.solvers.gradient import RowBlock
from mf_dist.stages.ingest import ingest_ratings
from mf_dist.storage.ingested import IngestResult
from tests.support.training import settings

RANK = 4
ALPHA = 2.0
EPSILON = 0.5
REGULARIZATION = 0.5
LIKE_THRESHOLD = 3.0
# Small blocks: several blocks on both sides, crowded ones cut into row pieces.
BLOCK_SIZE = 16


def reference_confidence(ratings: np.ndarray, mode: str) -> np.ndarray:
    """c of liked entries with rating r, written out: 1 + α, 1 + α r, or 1 + α log(1 + r/ε)."""
    if mode == "binary":
        return np.full(ratings.shape, 1.0 + ALPHA)
    if mode == "linear":
        return 1.0 + ALPHA * ratings
    return 1.0 + ALPHA * np.log1p(ratings / EPSILON)


def dense_targets(
    ratings: pd.DataFrame, ingest: IngestResult, mode: str = "linear"
) -> tuple[np.ndarray, np.ndarray]:
    """(P, C): preference and confidence, users × items in the trainer's row order, float64."""
    users = pq.read_table(ingest.users_path).to_pandas().sort_values("index")
    items = pq.read_table(ingest.items_path).to_pandas().sort_values("index")
    u = pd.Index(users["user_id"]).get_indexer(ratings["user_id"])
    i = pd.Index(items["item_id"]).get_indexer(ratings["item_id"])
    assert (u >= 0).all() and (i >= 0).all()
    liked = ratings["rating"].to_numpy() >= LIKE_THRESHOLD
    preference = np.zeros((ingest.n_users, ingest.n_items))
    confidence = np.ones((ingest.n_users, ingest.n_items))
    preference[u[liked], i[liked]] = 1.0
    confidence[u[liked], i[liked]] = reference_confidence(ratings["rating"].to_numpy()[liked], mode)
    return preference, confidence


def half_step(preference: np.ndarray, confidence: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Each row r of the dense problem: (Oᵀ diag(c_r) O + λI)⁻¹ Oᵀ diag(c_r) p_r, by numpy.linalg.solve."""
    ridge = REGULARIZATION * np.eye(other.shape[1])
    return np.stack(
        [
            np.linalg.solve(other.T @ (c[:, None] * other) + ridge, other.T @ (c * p))
            for p, c in zip(preference, confidence, strict=True)
        ]
    )


def dense_loss(users, items, preference, confidence) -> float:
    """Σ_{u,i} c_ui (p_ui − x_uᵀy_i)² + λ (‖U‖² + ‖V‖²) over all pairs."""
    fit = (confidence * (preference - users @ items.T) ** 2).sum()
    return float(fit + REGULARIZATION * ((users**2).sum() + (items**2).sum()))


def scatter_blocks(client, vectors: np.ndarray, grid) -> list:
    return [
        client.scatter(RowBlock(vectors=torch.from_numpy(vectors[start:stop].copy())))
        for _, start, stop in grid
    ]


# Measured gaps, largest |trainer − reference| over the side's largest
# |reference| entry: cholesky 1.7e-7 (users) and 4.0e-7 (items); cg 4.4e-7 and
# 1.6e-6. The trainer solves in float32 (6e-8 relative); CG runs cg_steps =
# rank steps from the previous rows, exact in exact arithmetic, and loses a
# little more to float32 round-off. Tolerances are about 5× the gaps. The
# reported loss was within 1.2e-9 (cholesky) and 3.9e-8 (cg) of the dense one
# (checked to 2e-7 relative).
# Every confidence mode once, each ALS method with the linear one and one other.
@pytest.mark.parametrize(
    ("als_method", "tolerance", "mode"),
    [("cholesky", 2e-6, "linear"), ("cg", 1e-5, "linear"), ("cholesky", 2e-6, "log"), ("cg", 1e-5, "binary")],
)
def test_one_epoch_equals_the_dense_reference(
    client, tmp_path, tiny_ratings, tiny_input, als_method, tolerance, mode
):
    ingest = ingest_ratings(
        client, str(tiny_input), tmp_path / "work", block_size=BLOCK_SIZE, like_threshold=LIKE_THRESHOLD
    )
    preference, confidence = dense_targets(tiny_ratings, ingest, mode)
    # Some users and items have no likes: their rows solve to zero on both sides.
    assert 0 < preference.sum() < preference.size
    rng = np.random.default_rng(3)
    start_users = rng.normal(scale=0.3, size=(ingest.n_users, RANK)).astype(np.float32)
    start_items = rng.normal(scale=0.3, size=(ingest.n_items, RANK)).astype(np.float32)

    chosen = settings(
        "implicit",
        "als",
        rank=RANK,
        epochs=1,
        alpha=ALPHA,
        confidence=mode,
        confidence_epsilon=EPSILON,
        regularization=REGULARIZATION,
        als_method=als_method,
        cg_steps=RANK,
    )
    initial = {
        "users": scatter_blocks(client, start_users, ingest.user_grid),
        "items": scatter_blocks(client, start_items, ingest.item_grid),
    }
    build = MODELS["implicit"].solvers["als"].factory()
    model = build(client, tmp_path / "work", ingest, chosen, None, initial)
    [measurement] = model.run_epoch(1)
    trained = {
        name: np.concatenate([block.vectors.numpy() for block in client.gather(blocks)]).astype(np.float64)
        for name, (_, blocks) in model.factor_blocks().items()
    }

    users = half_step(preference, confidence, start_items.astype(np.float64))
    items = half_step(preference.T, confidence.T, users)
    for name, expected in (("users", users), ("items", items)):
        gap = np.abs(trained[name] - expected).max() / np.abs(expected).max()
        assert gap < tolerance, f"{name}: {gap:.2e} from the dense reference ({als_method})"
    assert measurement.epoch == 1
    assert measurement.loss == pytest.approx(dense_loss(users, items, preference, confidence), rel=2e-7)
