"""NMF: the math layer against dense references and scikit-learn, and the sharded trainer end to end."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch
from sklearn.decomposition import NMF

from mf_dist.errors import TrainingError
from mf_dist.models import nmf
from mf_dist.settings import TrainSettings
from mf_dist.solvers.multiplicative import EPSILON, multiplicative_update
from mf_dist.solvers.rows import gram
from mf_dist.stages.cooccur import cooccurrence_blocks
from mf_dist.stages.ingest import ingest_ratings
from mf_dist.stages.train import train_factors
from mf_dist.storage.factor_files import block_seed
from mf_dist.storage.ingested import load_ingest_result

SEEDS = range(50)
STEPS = 30


def random_problem(seed: int, shape=(7, 5), rank=3, density=0.6):
    """A non-negative X (some zeros) and sklearn-style random non-negative W, H (rows), float64."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=generator, dtype=torch.float64) * 3
    x[torch.rand(*shape, generator=generator) > density] = 0
    scale = nmf.initial_scale(float(x.mean()), rank)
    w = torch.randn(shape[0], rank, generator=generator, dtype=torch.float64).abs() * scale
    h = torch.randn(shape[1], rank, generator=generator, dtype=torch.float64).abs() * scale
    return x, w, h


def dense_loss(x, w, h) -> float:
    return float(((x - w @ h.T) ** 2).sum())


def mu_step(x, w, h):
    """One whole update, W then H, through the row-block functions (two W blocks)."""
    h_gram = gram(h)
    cross = x @ h
    w = torch.cat([nmf.multiplicative_rows(w[a:b], cross[a:b], h_gram) for a, b in ((0, 3), (3, len(w)))])
    return w, nmf.multiplicative_rows(h, x.T @ w, gram(w))


def pg_step(x, w, h, learning_rate):
    w = nmf.projected_gradient_rows(w, x @ h, gram(h), learning_rate)
    return w, nmf.projected_gradient_rows(h, x.T @ w, gram(w), learning_rate)


def test_multiplicative_update_never_increases_the_loss():
    """Lee & Seung's theorem, checked at every half-step over 50 seeds × 30 steps; factors stay ≥ 0."""
    for seed in SEEDS:
        x, w, h = random_problem(seed)
        before = dense_loss(x, w, h)
        for _ in range(STEPS):
            w, h = mu_step(x, w, h)
            after = dense_loss(x, w, h)
            assert after <= before * (1 + 1e-12), f"seed {seed}: {before} → {after}"
            assert (w >= 0).all() and (h >= 0).all()
            before = after


def test_multiplicative_update_keeps_zero_columns_finite():
    """A zero column of H gives a zero denominator: the update yields 0 there, not NaN (sklearn's EPSILON)."""
    x, w, h = random_problem(3)
    h[:, 1] = 0
    w_new = nmf.multiplicative_rows(w, x @ h, gram(h))
    assert torch.isfinite(w_new).all()
    assert (w_new[:, 1] == 0).all()
    out = multiplicative_update(torch.ones(2), torch.zeros(2), torch.zeros(2))
    assert out.tolist() == [0.0, 0.0]
    assert multiplicative_update(torch.ones(1), torch.ones(1), torch.zeros(1)).item() == 1 / EPSILON


@pytest.mark.parametrize("learning_rate", [0.5, 1.0, 2.0])
def test_projected_gradient_never_increases_the_loss(learning_rate):
    for seed in SEEDS:
        x, w, h = random_problem(seed)
        before = dense_loss(x, w, h)
        for _ in range(STEPS):
            w, h = pg_step(x, w, h, learning_rate)
            after = dense_loss(x, w, h)
            assert after <= before * (1 + 1e-12) + 1e-12, f"seed {seed}: {before} → {after}"
            assert (w >= 0).all() and (h >= 0).all()
            before = after


def test_projected_gradient_step_above_the_bound_can_increase_the_loss():
    """The guarantee above is not vacuous: far past 2/L the same steps climb on some seed."""
    increased = False
    for seed in range(10):
        x, w, h = random_problem(seed)
        before = dense_loss(x, w, h)
        for _ in range(5):
            w, h = pg_step(x, w, h, 6.0)
            after = dense_loss(x, w, h)
            increased |= after > before * (1 + 1e-9)
            before = after
    assert increased


def test_blocked_loss_matches_dense():
    """‖X‖² − 2 Σ_b ⟨W_b, (XH)_b⟩ + ⟨WᵀW, HᵀH⟩ from row blocks equals the dense ‖X − WHᵀ‖²."""
    for seed in range(5):
        x, w, h = random_problem(seed, shape=(9, 6))
        cross = x @ h
        splits = [(0, 2), (2, 7), (7, 9)]
        inner = sum(nmf.block_inner(w[a:b], cross[a:b]) for a, b in splits)
        w_gram = sum(gram(w[a:b]) for a, b in splits)
        h_gram = sum(gram(h[a:b]) for a, b in ((0, 4), (4, 6)))
        loss = nmf.total_loss(float((x**2).sum()), inner, w_gram, h_gram)
        assert float(loss) == pytest.approx(dense_loss(x, w, h), rel=1e-12)


def test_initial_factor_is_nonnegative_deterministic_and_scaled():
    a = nmf.initial_factor(500, 4, 2.0, seed=5)
    assert a.dtype == torch.float32 and (a >= 0).all()
    assert torch.equal(a, nmf.initial_factor(500, 4, 2.0, seed=5))
    assert not torch.equal(a, nmf.initial_factor(500, 4, 2.0, seed=6))
    # E|N(0,1)| = sqrt(2/π).
    assert float(a.mean()) == pytest.approx(2.0 * np.sqrt(2 / np.pi), rel=0.05)
    assert nmf.initial_scale(8.0, 2) == 2.0


def sklearn_mu(x: np.ndarray, w: np.ndarray, h_rows: np.ndarray, iterations: int):
    """scikit-learn's multiplicative-update NMF from the given factors (float64), fixed iteration count."""
    model = NMF(
        n_components=w.shape[1],
        solver="mu",
        beta_loss="frobenius",
        init="custom",
        max_iter=iterations,
        tol=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: max_iter reached on purpose
        w_out = model.fit_transform(x, W=w.copy(), H=np.ascontiguousarray(h_rows.T))
    return w_out, model.components_.T, model.reconstruction_err_**2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_math_layer_matches_sklearn_mu(seed):
    """Same input, rank and start: our updates are scikit-learn's, step for step."""
    x, w, h = random_problem(seed, shape=(20, 15), rank=4)
    ours_w, ours_h = w, h
    for _ in range(100):
        ours_w, ours_h = mu_step(x, ours_w, ours_h)
    ref_w, ref_h, ref_loss = sklearn_mu(x.numpy(), w.numpy(), h.numpy(), 100)
    np.testing.assert_allclose(ours_w.numpy(), ref_w, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(ours_h.numpy(), ref_h, rtol=1e-8, atol=1e-12)
    assert dense_loss(x, ours_w, ours_h) == pytest.approx(ref_loss, rel=1e-9)


# --- the sharded trainer on a real cluster ----------------------------------------------------------


def settings(**overrides) -> TrainSettings:
    values = {
        "model": "nmf",
        "solver": "mu",
        "rank": 4,
        "epochs": 20,
        "learning_rate": 1.0,
        "regularization": 0.0,
        "batch_size": 64,
        "seed": 0,
        "tolerance": 0.0,
    }
    values.update(overrides)
    return TrainSettings(**values)


@pytest.fixture
def nmf_work(client, tmp_path, tiny_input):
    work = tmp_path / "work"
    ingest = ingest_ratings(client, str(tiny_input), work, block_size=100)
    cooccurrence_blocks(client, ingest, work)
    return work


def liked_matrix(ratings: pd.DataFrame, work) -> sp.csr_matrix:
    """S (users × items, binary) straight from the raw ratings and the ingest id maps."""
    ingest = load_ingest_result(work)
    users = pq.read_table(ingest.users_path).to_pandas()
    items = pq.read_table(ingest.items_path).to_pandas()
    u = pd.Index(users["user_id"]).get_indexer(ratings["user_id"])
    i = pd.Index(items["item_id"]).get_indexer(ratings["item_id"])
    assert (u >= 0).all() and (i >= 0).all()
    return sp.csr_matrix((np.ones(len(u)), (u, i)), shape=(len(users), len(items)))


def trainer_start(settings: TrainSettings, n_rows: int, n_cols: int, block_size: int, mean: float):
    """The trainer's start, rebuilt from its documented rule: scale·|N(0,1)| per (seed, side, block)."""
    scale = nmf.initial_scale(mean, settings.rank)

    def side(n: int, index: int) -> np.ndarray:
        blocks = [
            nmf.initial_factor(
                min(start + block_size, n) - start,
                settings.rank,
                scale,
                block_seed(settings.seed, 0, index, b),
            )
            for b, start in enumerate(range(0, n, block_size))
        ]
        return torch.cat(blocks).double().numpy()

    return side(n_rows, 0), side(n_cols, 1)


def read_table(result, name: str) -> np.ndarray:
    table = result.table(name)
    return np.concatenate([table.read_block(b)[0] for b in range(table.grid.n_blocks)])


@pytest.mark.parametrize(
    ("target", "x_products"), [("cooccurrence", "tiles"), ("cooccurrence", "likes"), ("ratings", "auto")]
)
def test_trainer_matches_sklearn(client, nmf_work, tiny_ratings, target, x_products):
    """The distributed mu solver ends where scikit-learn's does from the same start (float64 reference).

    X's products come from its stored tiles or as Sᵀ(S H) from the likes: both must match.
    """
    s = settings(target=target, x_products=x_products)
    result = train_factors(client, nmf_work, s)
    liked = liked_matrix(tiny_ratings, nmf_work)
    x = (liked.T @ liked).toarray() if target == "cooccurrence" else liked.toarray()
    w0, h0 = trainer_start(s, x.shape[0], x.shape[1], 100, float(x.mean()))
    ref_w, ref_h, ref_loss = sklearn_mu(x, w0, h0, s.epochs)

    names = ("items", "contexts") if target == "cooccurrence" else ("users", "items")
    assert {t.name for t in result.tables} == set(names)
    w, h = (read_table(result, name).astype(np.float64) for name in names)
    assert (w >= 0).all() and (h >= 0).all()
    ours = result.history[-1].loss
    # Measured after 20 epochs (tiles / likes / ratings): the loss is 1.2e-7 / 4.2e-8 / 1.1e-8
    # from scikit-learn's and 1.1e-7 / 4.3e-8 / 9.5e-9 from the stored factors' loss; the
    # largest factor entry gap over the largest entry is 1.1e-6 / 4.2e-7 / 3.7e-7. The
    # trainer stores float32 factors (6e-8 relative). Tolerances are ~8x the largest gaps.
    assert ours == pytest.approx(float(((x - w @ h.T) ** 2).sum()), rel=1e-6)
    assert ours == pytest.approx(ref_loss, rel=1e-6)
    for found, expected in ((w, ref_w), (h, ref_h)):
        assert np.abs(found - expected).max() < 1e-5 * np.abs(expected).max()
    losses = [r.loss for r in result.history]
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(losses))


def test_projected_gradient_trainer_lowers_the_loss(client, nmf_work):
    result = train_factors(client, nmf_work, settings(solver="gradient", epochs=15, target="ratings"))
    losses = [r.loss for r in result.history]
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(losses))
    assert losses[-1] < 0.95 * losses[0]


def test_gradient_divergence_is_a_clear_error(client, nmf_work):
    advice = r"lower --learning-rate \(now 1e\+30\)"
    with pytest.raises(TrainingError, match=rf"(non-finite|diverged) at epoch \d+: .*{advice}"):
        train_factors(client, nmf_work, settings(solver="gradient", learning_rate=1e30, epochs=5))


def test_export_and_warm_start_with_contexts(client, nmf_work, tmp_path):
    """Both NMF tables publish with item ids, and a warm start from them beats a cold start."""
    from mf_dist.stages.export import export_tables

    ingest = load_ingest_result(nmf_work)
    trained = train_factors(client, nmf_work, settings(epochs=8))
    exported = export_tables(client, trained, ingest, tmp_path / "out", run_id="r1", config={})
    assert {t.name for t in exported.tables} == {"items", "contexts"}
    items = pq.read_table(ingest.items_path).to_pandas()
    for name in ("items", "contexts"):
        table = pq.read_table(tmp_path / "out" / name / "runs" / "r1").to_pandas()
        assert table["item_id"].tolist() == items["item_id"].tolist()
        np.testing.assert_array_equal(np.stack(table["embedding"].to_numpy()), read_table(trained, name))
    cold = train_factors(client, nmf_work, settings(epochs=2))
    warm = train_factors(client, nmf_work, settings(epochs=2, init_from=str(tmp_path / "out")))
    assert warm.history[0].loss < cold.history[-1].loss
    assert warm.history[0].loss <= trained.history[-1].loss
