"""Co-occurrence ALS and the weighted (GloVe-style) loss: math against dense references, trainers."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch

from mf_dist.errors import ConfigError, TrainingError
from mf_dist.models import cooccurrence, cooccurrence_weighted
from mf_dist.settings import TrainSettings
from mf_dist.solvers.rows import gram
from mf_dist.stages.cooccur import cooccurrence_blocks
from mf_dist.stages.ingest import ingest_ratings
from mf_dist.stages.train import train_factors
from mf_dist.storage.ingested import load_ingest_result

N_ITEMS = 12
SPLIT = [(0, 4), (4, 9), (9, N_ITEMS)]


def cooccurrence_matrix(seed=0, n_items=N_ITEMS, n_users=9):
    """X₀ = SᵀS without its diagonal, for a random binary S (float64)."""
    generator = torch.Generator().manual_seed(seed)
    s = (torch.rand(n_users, n_items, generator=generator) < 0.4).double()
    x = s.T @ s
    return x - torch.diag(torch.diagonal(x))


def factors(rank, seed=1, n_items=N_ITEMS, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_items, rank, generator=generator, dtype=torch.float64).to(dtype)


def dense_loss(v, x0):
    """Σ_{i≠j} (v_iᵀv_j − X_ij)² from the full matrix."""
    off = ~torch.eye(len(x0), dtype=torch.bool)
    return float(((v.double() @ v.double().T - x0) ** 2)[off].sum())


# --- ALS ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_als_rows_equal_lstsq(rank, seed):
    """Each row's solve is numpy's least-squares fit of X_i,j≠i by the other rows v_j, j ≠ i."""
    x0 = cooccurrence_matrix(seed)
    v = factors(rank, seed=seed + 10)
    a, b = SPLIT[1]
    solution = cooccurrence.als_rows(v[a:b], v.T @ v, (x0 @ v)[a:b], relative_ridge=0.0)
    for i in range(a, b):
        others = [j for j in range(N_ITEMS) if j != i]
        expected = np.linalg.lstsq(v[others].numpy(), x0[i, others].numpy(), rcond=None)[0]
        np.testing.assert_allclose(solution[i - a].numpy(), expected, rtol=1e-9, atol=1e-10)
    # The default numerical ridge moves the answer by far less than a float32 factor's precision.
    ridged = cooccurrence.als_rows(v[a:b], v.T @ v, (x0 @ v)[a:b], relative_ridge=1e-6)
    np.testing.assert_allclose(ridged.numpy(), solution.numpy(), rtol=1e-4, atol=1e-5)


def test_als_rows_survive_a_singular_system():
    """A rank-3 row with only two non-zero other rows gets a finite answer."""
    v = torch.zeros(5, 3, dtype=torch.float64)
    v[1, 0], v[2, 1] = 1.0, 2.0
    x0 = cooccurrence_matrix(0, n_items=5)
    solution = cooccurrence.als_rows(v[:1], v.T @ v, (x0 @ v)[:1], relative_ridge=1e-6)
    assert torch.isfinite(solution).all()


@pytest.mark.parametrize("block", SPLIT)
def test_line_search_polynomial_and_block_objective_match_dense(block):
    """L(V + tD) − L(V) for a move of one block equals the quartic, and the block objective's change."""
    x0 = cooccurrence_matrix(3)
    v = factors(3, seed=4)
    a, b = block
    d = torch.randn(b - a, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g, cross, tile = v.T @ v, (x0 @ v)[a:b], x0[a:b, a:b]
    p = cooccurrence.line_search_polynomial(v[a:b], d, g, cross, tile @ d)
    others = g - v[a:b].T @ v[a:b]
    external = cross - tile @ v[a:b]
    base = cooccurrence.block_objective(v[a:b], tile @ v[a:b], others, external)
    for t in (-0.5, 0.25, 1.0, 1.7):
        moved = v.clone()
        moved[a:b] += t * d
        change = dense_loss(moved, x0) - dense_loss(v, x0)
        quartic = float(p[0] * t + p[1] * t**2 + p[2] * t**3 + p[3] * t**4)
        direct = float(cooccurrence.block_objective(moved[a:b], tile @ moved[a:b], others, external) - base)
        assert quartic == pytest.approx(change, rel=1e-9, abs=1e-9)
        assert direct == pytest.approx(change, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("seed", range(20))
def test_quartic_minimizer_finds_the_minimum_on_the_unit_interval(seed):
    coefficients = torch.randn(4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    coefficients[3] = coefficients[3].abs()
    t = cooccurrence.quartic_minimizer(coefficients)
    grid = np.linspace(0, 1, 100_001)
    values = sum(float(coefficients[i]) * grid ** (i + 1) for i in range(4))
    found = sum(float(coefficients[i]) * t ** (i + 1) for i in range(4))
    assert 0 <= t <= 1
    assert found <= min(values.min(), 0.0) + 1e-9


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout", ["dense", "csr", "none"])
def test_block_gauss_seidel_never_increases_the_loss(dtype, layout):
    """Sweeps of als_block_update over the blocks: the dense loss never rises; reported changes are exact."""
    for seed in range(10):
        x0 = cooccurrence_matrix(seed)
        if layout == "none":
            # Zero diagonal tiles: X₀ restricted to the blocks' off-diagonal tiles.
            for a, b in SPLIT:
                x0[a:b, a:b] = 0
        v = factors(4, seed=seed + 100, dtype=dtype)
        loss = dense_loss(v, x0)
        for _ in range(6):
            for a, b in SPLIT:
                tile = x0[a:b, a:b]
                tile_arg = {"dense": tile, "csr": tile.to_sparse_csr(), "none": None}[layout]
                external = (x0 @ v.double())[a:b] - tile @ v[a:b].double()
                new, change, step = cooccurrence.als_block_update(v[a:b], gram(v), external, tile_arg, 1e-6)
                assert new.dtype == dtype and 0 <= step <= 1 and change <= 0
                v = v.clone()
                v[a:b] = new
                after = dense_loss(v, x0)
                assert after <= loss * (1 + 1e-12), f"seed {seed}: {loss} → {after}"
                assert after - loss == pytest.approx(change, rel=1e-6, abs=1e-8 * loss)
                loss = after
        assert loss < 0.5 * dense_loss(factors(4, seed=seed + 100, dtype=dtype), x0)


# --- weighted loss --------------------------------------------------------------------------------


def dense_weighted_loss(v, x0, x_max, power, log_target):
    """Σ_{i≠j, X_ij>0} f(X_ij)(v_iᵀv_j − t_ij)², written out from the definition."""
    mask = x0 > 0
    f = torch.clamp((x0[mask] / x_max) ** power, max=1.0)
    t = torch.log(x0[mask]) if log_target else x0[mask]
    return (f * ((v @ v.T)[mask] - t) ** 2).sum()


def test_weights_and_targets():
    counts = torch.tensor([0.0, 1.0, 50.0, 100.0, 400.0])
    np.testing.assert_allclose(
        cooccurrence_weighted.weights(counts, 100.0, 0.75).numpy(),
        [0.0, 0.01**0.75, 0.5**0.75, 1.0, 1.0],
        rtol=1e-6,
    )
    assert cooccurrence_weighted.targets(counts, True).tolist()[:2] == [0.0, 0.0]
    assert cooccurrence_weighted.targets(counts, True)[2].item() == pytest.approx(np.log(50.0))
    assert torch.equal(cooccurrence_weighted.targets(counts, False), counts)


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_weighted_tiles_match_autograd(layout, log_target):
    """Summed over the stored tiles (b ≤ c), loss and gradient equal autograd on the dense formula."""
    x0 = cooccurrence_matrix(2) * 3
    x_max, power = 5.0, 0.75
    v = factors(3, seed=7)
    loss = torch.zeros((), dtype=torch.float64)
    gradient = torch.zeros_like(v)
    for (a, b), (c, d) in itertools.combinations_with_replacement(SPLIT, 2):
        counts = x0[a:b, c:d]
        weight = cooccurrence_weighted.weights(counts, x_max, power)
        target = cooccurrence_weighted.targets(counts, log_target)
        multiplicity = 1 if a == c else 2
        if layout == "dense":
            share, g_rows, g_cols = cooccurrence_weighted.dense_tile_terms(
                weight, target, v[a:b], v[c:d], multiplicity
            )
        else:
            rows, cols = (counts > 0).nonzero(as_tuple=True)
            share, g_rows, g_cols = cooccurrence_weighted.sparse_tile_terms(
                rows, cols, weight[rows, cols], target[rows, cols], v[a:b], v[c:d], multiplicity
            )
        loss += share
        gradient[a:b] += g_rows
        gradient[c:d] += g_cols
    reference = v.clone().requires_grad_(True)
    expected = dense_weighted_loss(reference, x0, x_max, power, log_target)
    expected.backward()
    assert float(loss) == pytest.approx(float(expected.detach()), rel=1e-12)
    torch.testing.assert_close(gradient, reference.grad, rtol=1e-10, atol=1e-10)


def test_sparse_tile_terms_chunk_like_one_pass(monkeypatch):
    x0 = cooccurrence_matrix(4)
    rows, cols = (x0 > 0).nonzero(as_tuple=True)
    v = factors(3, seed=8)
    args = (rows, cols, torch.ones(len(rows), dtype=torch.float64), x0[rows, cols], v, v, 1)
    whole = cooccurrence_weighted.sparse_tile_terms(*args)
    monkeypatch.setattr(cooccurrence_weighted, "GATHER_BUDGET_FLOATS", 7)
    chunked = cooccurrence_weighted.sparse_tile_terms(*args)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b)


# --- trainers on a real cluster -------------------------------------------------------------------


def settings(**overrides) -> TrainSettings:
    values = {
        "model": "cooccurrence",
        "solver": "als",
        "rank": 4,
        "epochs": 6,
        "learning_rate": 0.1,
        "regularization": 0.0,
        "batch_size": 64,
        "seed": 0,
        "tolerance": 0.0,
    }
    values.update(overrides)
    return TrainSettings(**values)


@pytest.fixture
def work(client, tmp_path, tiny_input):
    path = tmp_path / "work"
    ingest = ingest_ratings(client, str(tiny_input), path, block_size=100)
    cooccurrence_blocks(client, ingest, path)
    return path


def dense_cooccurrence(ratings: pd.DataFrame, work) -> torch.Tensor:
    """X₀ (items × items, float64, zero diagonal) straight from the raw ratings and the item id map."""
    ingest = load_ingest_result(work)
    users = pd.Index(ratings["user_id"].unique())
    items = pq.read_table(ingest.items_path).to_pandas()
    i = pd.Index(items["item_id"]).get_indexer(ratings["item_id"])
    s = sp.csr_matrix(
        (np.ones(len(i)), (users.get_indexer(ratings["user_id"]), i)), shape=(len(users), len(items))
    )
    x = torch.from_numpy((s.T @ s).toarray())
    return x - torch.diag(torch.diagonal(x))


def item_factors(result) -> torch.Tensor:
    table = result.table("items")
    return torch.from_numpy(np.concatenate([table.read_block(b)[0] for b in range(table.grid.n_blocks)]))


def test_als_trainer_tracks_the_exact_loss(client, work, tiny_ratings):
    """The tracked loss falls every epoch and equals the dense loss of the stored factors."""
    result = train_factors(client, work, settings(epochs=8))
    losses = [r.loss for r in result.history]
    assert [r.epoch for r in result.history] == list(range(9))
    assert all(b <= a for a, b in itertools.pairwise(losses))
    assert losses[-1] < 0.1 * losses[0]
    x0 = dense_cooccurrence(tiny_ratings, work)
    assert losses[-1] == pytest.approx(dense_loss(item_factors(result), x0), rel=1e-9)
    assert all(0 < r.metrics["mean_line_search_step"] <= 1 for r in result.history[1:])


def test_als_with_the_weighted_loss_is_refused(client, work):
    with pytest.raises(ConfigError, match=r"weighted.* has only the gradient solver"):
        train_factors(client, work, settings(loss="weighted"))


def test_weighted_trainer_lowers_its_loss_deterministically(client, work, tiny_ratings):
    s = settings(solver="gradient", loss="weighted", log_target=True, weight_x_max=10.0, epochs=8)
    first = train_factors(client, work, s)
    losses = [r.loss for r in first.history]
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
    x0 = dense_cooccurrence(tiny_ratings, work)
    v = item_factors(first).double()
    assert losses[-1] == pytest.approx(float(dense_weighted_loss(v, x0, 10.0, 0.75, True)), rel=1e-5)
    second = train_factors(client, work, s)
    assert [r.loss for r in second.history] == losses
    assert torch.equal(item_factors(second), item_factors(first))


def test_weighted_trainer_resumes_with_its_optimiser_state(client, work):
    s = settings(solver="gradient", loss="weighted", epochs=4)
    whole = train_factors(client, work, s)
    train_factors(client, work, s.model_copy(update={"epochs": 2}))
    resumed = train_factors(client, work, s.model_copy(update={"resume": True}))
    assert [r.loss for r in resumed.history] == pytest.approx([r.loss for r in whole.history], rel=1e-6)
    torch.testing.assert_close(item_factors(resumed), item_factors(whole), rtol=1e-5, atol=1e-6)


def test_weighted_divergence_is_a_clear_error(client, work):
    advice = r"lower --learning-rate \(now 1e\+30\)"
    with pytest.raises(TrainingError, match=rf"(non-finite|diverged) at epoch \d+: .*{advice}"):
        train_factors(
            client, work, settings(solver="gradient", loss="weighted", learning_rate=1e30, epochs=4)
        )
