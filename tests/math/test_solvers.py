"""ALS math against dense references: normal equations, CG, explicit and implicit row updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mf_dist.models import explicit, implicit
from mf_dist.solvers import normal_equations


def random_entries(n_rows: int, n_cols: int, density: float, seed: int, empty_row: bool = True):
    """Observed entries sorted by row (row 0 left empty to cover rows without data)."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_rows, n_cols, generator=generator) < density
    if empty_row:
        mask[0] = False
    rows, cols = mask.nonzero(as_tuple=True)
    values = torch.randint(1, 6, (len(rows),), generator=generator).double()
    return rows, cols, values


def spd_batch(n: int, k: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(n, k, k, generator=generator, dtype=torch.float64)
    return a @ a.transpose(1, 2) + 0.5 * torch.eye(k, dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 4, 17])
def test_batched_cholesky_matches_numpy(k):
    gram = spd_batch(6, k, seed=k)
    rhs = torch.randn(6, k, dtype=torch.float64)
    expected = np.linalg.solve(gram.numpy(), rhs.numpy()[..., None])[..., 0]
    np.testing.assert_allclose(
        normal_equations.solve_normal_equations(gram, rhs).numpy(), expected, rtol=1e-8
    )


def test_singular_row_gets_a_ridge_not_a_failure():
    gram = torch.zeros(2, 3, 3, dtype=torch.float64)
    gram[1] = torch.eye(3, dtype=torch.float64)
    solution = normal_equations.solve_normal_equations(gram, torch.ones(2, 3, dtype=torch.float64))
    assert torch.isfinite(solution).all()
    torch.testing.assert_close(solution[1], torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("k", [2, 5, 9])
def test_conjugate_gradient_converges_in_k_steps(k):
    gram = spd_batch(4, k, seed=3)
    rhs = torch.randn(4, k, dtype=torch.float64)
    solution = normal_equations.conjugate_gradient(
        lambda x: (gram @ x.unsqueeze(2)).squeeze(2), rhs, torch.zeros_like(rhs), steps=k
    )
    expected = torch.linalg.solve(gram, rhs)
    torch.testing.assert_close(solution, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("regularization", [0.0, 0.1, 3.0])
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_explicit_als_rows_equal_lstsq(rank, regularization):
    n_rows, n_cols = 7, 12
    rows, cols, values = random_entries(n_rows, n_cols, 0.6, seed=rank)
    generator = torch.Generator().manual_seed(11)
    col_vectors = torch.randn(n_cols, rank, generator=generator, dtype=torch.float64)
    col_bias = torch.randn(n_cols, generator=generator, dtype=torch.float64)
    mean = 3.2
    vectors, bias = explicit.als_update_rows(
        rows, cols, values, n_rows, col_vectors, col_bias, mean, regularization
    )
    for r in range(n_rows):
        observed = rows == r
        if not observed.any():
            assert torch.all(vectors[r] == 0) and bias[r] == 0
            continue
        features = np.hstack([col_vectors[cols[observed]].numpy(), np.ones((int(observed.sum()), 1))])
        target = (values[observed] - mean - col_bias[cols[observed]]).numpy()
        ridge = np.sqrt(regularization * int(observed.sum())) * np.eye(rank + 1)
        stacked = np.vstack([features, ridge])
        expected = np.linalg.lstsq(stacked, np.concatenate([target, np.zeros(rank + 1)]), rcond=None)[0]
        if regularization == 0 and observed.sum() < rank + 1:
            continue  # under-determined: any minimiser will do
        np.testing.assert_allclose(vectors[r].numpy(), expected[:rank], rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(float(bias[r]), expected[rank], rtol=1e-6, atol=1e-8)


def test_explicit_als_is_a_stationary_point_of_the_gradient_objective():
    rows, cols, values = random_entries(9, 10, 0.7, seed=5)
    col_vectors = torch.randn(10, 4, dtype=torch.float64)
    col_bias = torch.randn(10, dtype=torch.float64)
    vectors, bias = explicit.als_update_rows(rows, cols, values, 9, col_vectors, col_bias, 3.0, 0.2)
    vectors.requires_grad_(True)
    bias.requires_grad_(True)
    total, _ = explicit.batch_objective(
        vectors[rows], col_vectors[cols], bias[rows], col_bias[cols], values, 3.0, 0.2
    )
    # The ALS rows minimise the gradient solver's objective: its gradient vanishes there
    # (the column side's penalty does not depend on the rows).
    total.backward()
    torch.testing.assert_close(vectors.grad, torch.zeros_like(vectors), atol=1e-9, rtol=0)
    torch.testing.assert_close(bias.grad, torch.zeros_like(bias), atol=1e-9, rtol=0)


CONFIDENCE_MODES = ["binary", "linear", "log"]


def reference_confidence(values: np.ndarray, alpha: float, mode: str, epsilon: float = 1.0) -> np.ndarray:
    """c of the liked entries written out per mode (Hu et al. 2008: 1 + α r and 1 + α log(1 + r/ε))."""
    if mode == "binary":
        return np.full(values.shape, 1.0 + alpha)
    if mode == "linear":
        return 1.0 + alpha * values
    return 1.0 + alpha * np.log(1.0 + values / epsilon)


@pytest.mark.parametrize("mode", CONFIDENCE_MODES)
def test_confidence_is_one_plus_alpha_times_the_modes_weight(mode):
    values = torch.tensor([1.0, 2.0, 4.0, 5.0, 0.5], dtype=torch.float64)
    expected = reference_confidence(values.numpy(), 3.0, mode, 0.5)
    np.testing.assert_allclose(implicit.confidence(values, 3.0, mode, 0.5).numpy(), expected, rtol=1e-12)
    weights = implicit.confidence_weights(values, mode, 0.5)
    np.testing.assert_allclose(1 + 3.0 * weights.numpy(), expected, rtol=1e-12)


def test_log_confidence_never_drops_below_one_and_unknown_modes_are_refused():
    values = torch.tensor([-3.0, 0.0, 2.0], dtype=torch.float64)
    assert (implicit.confidence(values, 10.0, "log") >= 1.0).all()
    with pytest.raises(ValueError, match="unknown confidence 'square'"):
        implicit.confidence_weights(values, "square")  # type: ignore[arg-type]


def dense_implicit_reference(
    rows, cols, values, n_rows, n_cols, col_vectors, alpha, regularization, mode="linear", epsilon=1.0
):
    """Hu et al. (2008), eq. 4, row by row with dense C_u and p_u."""
    preference = np.zeros((n_rows, n_cols))
    confidence = np.ones((n_rows, n_cols))
    preference[rows.numpy(), cols.numpy()] = 1.0
    confidence[rows.numpy(), cols.numpy()] = reference_confidence(values.numpy(), alpha, mode, epsilon)
    y = col_vectors.numpy()
    k = y.shape[1]
    solution = np.zeros((n_rows, k))
    for u in range(n_rows):
        cu = np.diag(confidence[u])
        solution[u] = np.linalg.solve(y.T @ cu @ y + regularization * np.eye(k), y.T @ cu @ preference[u])
    return solution


@pytest.mark.parametrize("mode", CONFIDENCE_MODES)
@pytest.mark.parametrize("alpha", [1.0, 40.0])
@pytest.mark.parametrize("rank", [2, 6])
def test_implicit_exact_rows_match_hu_koren_volinsky(rank, alpha, mode):
    n_rows, n_cols = 8, 15
    rows, cols, values = random_entries(n_rows, n_cols, 0.3, seed=rank)
    col_vectors = torch.randn(n_cols, rank, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    weights = implicit.confidence_weights(values, mode, 2.0)
    solution = implicit.exact_update_rows(
        rows, cols, weights, n_rows, col_vectors, col_vectors.T @ col_vectors, alpha, 0.1
    )
    expected = dense_implicit_reference(
        rows, cols, values, n_rows, n_cols, col_vectors, alpha, 0.1, mode, 2.0
    )
    np.testing.assert_allclose(solution.numpy(), expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("mode", CONFIDENCE_MODES)
def test_implicit_cg_with_k_steps_equals_the_exact_solve(mode):
    rank, n_rows, n_cols = 5, 6, 20
    rows, cols, values = random_entries(n_rows, n_cols, 0.4, seed=9)
    values = implicit.confidence_weights(values, mode)
    col_vectors = torch.randn(n_cols, rank, dtype=torch.float64)
    start = torch.randn(n_rows, rank, dtype=torch.float64)
    gram = col_vectors.T @ col_vectors
    exact = implicit.exact_update_rows(rows, cols, values, n_rows, col_vectors, gram, 3.0, 0.5)
    cg, _ = implicit.cg_update_rows(rows, cols, values, start, col_vectors, gram, 3.0, 0.5, steps=rank)
    torch.testing.assert_close(cg, exact, rtol=1e-6, atol=1e-8)
    # A few steps already move most of the way, as Takács et al. report.
    three, _ = implicit.cg_update_rows(rows, cols, values, start, col_vectors, gram, 3.0, 0.5, steps=3)
    assert torch.linalg.norm(three - exact) < 0.5 * torch.linalg.norm(start - exact)


def dense_implicit_loss(x, y, rows, cols, values, alpha, regularization, mode="linear"):
    preference = torch.zeros(x.shape[0], y.shape[0], dtype=x.dtype)
    confidence = torch.ones_like(preference)
    preference[rows, cols] = 1.0
    confidence[rows, cols] = torch.from_numpy(reference_confidence(values.numpy(), alpha, mode)).to(x.dtype)
    return (confidence * (preference - x @ y.T) ** 2).sum() + regularization * ((x**2).sum() + (y**2).sum())


@pytest.mark.parametrize("mode", CONFIDENCE_MODES)
def test_implicit_loss_and_gradient_match_autograd_on_the_dense_formula(mode):
    rows, cols, values = random_entries(7, 11, 0.35, seed=4)
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(11, 3, dtype=torch.float64)
    dense = dense_implicit_loss(x, y, rows, cols, values, 2.0, 0.3, mode)
    dense.backward()
    weights = implicit.confidence_weights(values, mode)
    liked = implicit.liked_loss_terms(rows, cols, weights, x.detach(), y, 2.0)
    squared = (x.detach() ** 2).sum() + (y**2).sum()
    blocked = implicit.total_loss(x.detach().T @ x.detach(), y.T @ y, liked, squared, 0.3)
    torch.testing.assert_close(blocked, dense.detach())
    gradient = implicit.row_gradient(rows, cols, weights, x.detach(), y, y.T @ y, 2.0, 0.3)
    torch.testing.assert_close(gradient, x.grad)


def test_row_chunks_do_not_change_the_solution(monkeypatch):
    rows, cols, values = random_entries(30, 12, 0.5, seed=8)
    col_vectors = torch.randn(12, 4, dtype=torch.float64)
    col_bias = torch.randn(12, dtype=torch.float64)
    whole = explicit.als_update_rows(rows, cols, values, 30, col_vectors, col_bias, 3.0, 0.1)
    monkeypatch.setattr(normal_equations, "DEFAULT_BUDGET_BYTES", 7 * 25 * 4)
    assert len(list(normal_equations.row_chunks(30, 5))) == 5
    chunked = explicit.als_update_rows(rows, cols, values, 30, col_vectors, col_bias, 3.0, 0.1)
    torch.testing.assert_close(chunked[0], whole[0])
    torch.testing.assert_close(chunked[1], whole[1])


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("budget", [None, 64])
def test_row_gram_sums_equal_the_dense_sum_of_outer_products(monkeypatch, weighted, budget):
    """Rows with 0, 1 and up to 40 entries (several padded lengths); a tiny budget forces chunks."""
    if budget is not None:
        monkeypatch.setattr(normal_equations, "ENTRY_BUDGET_FLOATS", budget)
    generator = torch.Generator().manual_seed(3)
    counts = torch.tensor([0, 1, 2, 3, 5, 8, 13, 21, 40, 0, 7, 7, 1])
    rows = torch.repeat_interleave(torch.arange(len(counts)), counts)
    cols = torch.randint(0, 50, (len(rows),), generator=generator)
    features = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    weights = torch.rand(len(rows), generator=generator, dtype=torch.float64) - 0.2 if weighted else None

    gram = normal_equations.row_gram_sums(rows, cols, features, len(counts), weights)

    expected = torch.zeros(len(counts), 6, 6, dtype=torch.float64)
    for entry in range(len(rows)):
        f = features[cols[entry]]
        expected[rows[entry]] += (1.0 if weights is None else weights[entry]) * torch.outer(f, f)
    torch.testing.assert_close(gram, expected)


def test_padded_lengths_cover_every_count():
    counts = torch.arange(0, 5000)
    lengths = normal_equations.padded_lengths(counts)
    assert bool((lengths >= counts).all()) and int(lengths[0]) == 0
    assert bool((lengths[1:] % 4 == 0).all())
    assert float((lengths[100:].double() / counts[100:].double()).max()) <= 1.3
    assert len(torch.unique(lengths)) < 60


def test_block_objective_equals_the_gathered_batch_objective():
    rows, cols, values = random_entries(25, 14, 0.4, seed=11)
    generator = torch.Generator().manual_seed(5)
    row_vectors = torch.randn(25, 6, generator=generator)
    col_vectors = torch.randn(14, 6, generator=generator)
    row_bias, col_bias = torch.randn(25, generator=generator), torch.randn(14, generator=generator)

    total, squared_error = explicit.block_objective(
        rows, cols, values, row_vectors, col_vectors, row_bias, col_bias, 3.2, 0.07
    )
    expected = explicit.batch_objective(
        row_vectors[rows].double(),
        col_vectors[cols].double(),
        row_bias[rows].double(),
        col_bias[cols].double(),
        values,
        3.2,
        0.07,
    )
    torch.testing.assert_close(total, expected[0])
    torch.testing.assert_close(squared_error, expected[1])


def test_explicit_cg_with_k_plus_1_steps_equals_the_exact_solve():
    rows, cols, values = random_entries(20, 15, 0.4, seed=12)
    generator = torch.Generator().manual_seed(9)
    col_vectors = torch.randn(15, 4, generator=generator, dtype=torch.float64)
    col_bias = torch.randn(15, generator=generator, dtype=torch.float64)
    start_vectors = torch.randn(20, 4, generator=generator, dtype=torch.float64)
    start_bias = torch.randn(20, generator=generator, dtype=torch.float64)
    exact = explicit.als_update_rows(rows, cols, values, 20, col_vectors, col_bias, 3.0, 0.1)
    solved = explicit.cg_update_rows(
        rows, cols, values, start_vectors, start_bias, col_vectors, col_bias, 3.0, 0.1, steps=5
    )
    torch.testing.assert_close(solved[0], exact[0])
    torch.testing.assert_close(solved[1], exact[1])
    one_step = explicit.cg_update_rows(
        rows, cols, values, start_vectors, start_bias, col_vectors, col_bias, 3.0, 0.1, steps=1
    )

    def objective(vectors: torch.Tensor, bias: torch.Tensor) -> float:
        return float(
            explicit.block_objective(rows, cols, values, vectors, col_vectors, bias, col_bias, 3.0, 0.1)[0]
        )

    # The block's part of the objective in these rows falls with the first step and is least at the solution.
    assert objective(*exact) <= objective(*one_step) < objective(start_vectors, start_bias)
