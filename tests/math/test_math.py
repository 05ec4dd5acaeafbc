"""Tests of the pure-torch math layer against dense references.

Covers the blocked co-occurrence loss and gradient, the explicit-ratings
objective, and the Adam / SparseAdam solvers that carry their state between
calls.
"""

import functools
import itertools

import pytest
import torch

from mf_dist.blocks import RowBlock
from mf_dist.models import cooccurrence, explicit
from mf_dist.solvers.gradient import optimizer_step, sparse_adam_pass
from mf_dist.solvers.rows import gram

N_ITEMS = 12
SPLITS = {2: [0, 5, N_ITEMS], 3: [0, 4, 9, N_ITEMS]}
TOLERANCES = {torch.float64: {"rtol": 1e-10, "atol": 1e-9}, torch.float32: {"rtol": 1e-4, "atol": 1e-3}}


def cooccurrence_matrix(seed=0, n_items=N_ITEMS, n_users=9):
    """X = SᵀS for a random binary S (int64), and X₀ = X with its diagonal set to zero."""
    generator = torch.Generator().manual_seed(seed)
    s = (torch.rand(n_users, n_items, generator=generator) < 0.4).long()
    x = s.T @ s
    x0 = x - torch.diag(torch.diagonal(x))
    return x, x0


def random_factors(rank, dtype, seed=1, n_items=N_ITEMS):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_items, rank, generator=generator, dtype=torch.float64).to(dtype)


def dense_loss(v, x):
    """Σ_{i≠j} (v_iᵀv_j − X_ij)², from the full M × M matrix (autograd-friendly)."""
    off_diagonal = ~torch.eye(x.shape[0], dtype=torch.bool)
    residual = v @ v.T - x.to(v.dtype)
    return (residual**2)[off_diagonal].sum()


@pytest.fixture(params=[torch.float64, torch.float32], ids=["f64", "f32"])
def dtype(request):
    return request.param


@pytest.fixture(params=[1, 4], ids=["rank1", "rank4"])
def rank(request):
    return request.param


@pytest.fixture(params=[2, 3], ids=["2blocks", "3blocks"])
def split(request):
    return SPLITS[request.param]


def test_cooccurrence_fixture_is_sensible():
    """The test matrix is symmetric, non-negative, has non-zero off-diagonal entries."""
    x, x0 = cooccurrence_matrix()
    assert torch.equal(x, x.T)
    assert (x >= 0).all()
    assert (torch.diagonal(x0) == 0).all()
    assert x0.sum() > 0
    assert (torch.diagonal(x) > 0).any()


def blocked_problem(rank, dtype, split):
    """X, X₀, V, X₀V, the row blocks of ``split`` and G summed over those blocks."""
    x, x0 = cooccurrence_matrix()
    v = random_factors(rank, dtype)
    x0v = x0.to(dtype) @ v
    blocks = list(itertools.pairwise(split))
    g = sum(gram(v[a:b]) for a, b in blocks)
    return x, x0, v, x0v, blocks, g


def test_blocked_loss_matches_dense(dtype, rank, split):
    """gram + block_loss_terms summed over row blocks + total_loss equal the dense loss."""
    x, x0, v, x0v, blocks, g = blocked_problem(rank, dtype, split)
    assert g.dtype == torch.float64
    fourth, cross = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for a, b in blocks:
        f, c = cooccurrence.block_loss_terms(v[a:b], x0v[a:b])
        assert f.dtype == c.dtype == torch.float64
        fourth, cross = fourth + f, cross + c
    loss = cooccurrence.total_loss(g, fourth, cross, float((x0.double() ** 2).sum()))

    expected = dense_loss(v.double(), x)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, **TOLERANCES[dtype])


def test_block_gradient_matches_autograd(dtype, rank, split):
    """block_gradient per row block, stacked, equals autograd's gradient of the dense loss."""
    x, _, v, x0v, blocks, g = blocked_problem(rank, dtype, split)

    grads = [cooccurrence.block_gradient(v[a:b], g, x0v[a:b]) for a, b in blocks]
    assert all(grad.dtype == dtype for grad in grads)
    assert [grad.shape for grad in grads] == [v[a:b].shape for a, b in blocks]

    reference = v.double().clone().requires_grad_(True)
    dense_loss(reference, x).backward()
    torch.testing.assert_close(torch.cat(grads).double(), reference.grad, **TOLERANCES[dtype])


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
@pytest.mark.parametrize(("rows", "cols"), [((0, 5), (5, 12)), ((7, 12), (0, 3))])
def test_tile_products(dtype, rank, sparse, rows, cols):
    """tile_products of a non-square off-diagonal tile returns (X_bc V_c, X_bcᵀ V_b)."""
    _, x0 = cooccurrence_matrix()
    v = random_factors(rank, dtype)
    tile = x0[rows[0] : rows[1], cols[0] : cols[1]]
    v_b, v_c = v[rows[0] : rows[1]], v[cols[0] : cols[1]]
    if sparse:
        forward, backward = cooccurrence.tile_products(
            tile.to_sparse_csr(), tile.T.contiguous().to_sparse_csr(), v_b, v_c
        )
    else:
        forward, backward = cooccurrence.tile_products(tile, None, v_b, v_c)

    dense_tile = tile.to(torch.float64)
    assert forward.shape == v_b.shape and backward.shape == v_c.shape
    assert forward.dtype == backward.dtype == dtype
    assert not forward.is_sparse and forward.layout == torch.strided
    torch.testing.assert_close(forward.double(), dense_tile @ v_c.double(), **TOLERANCES[dtype])
    torch.testing.assert_close(backward.double(), dense_tile.T @ v_b.double(), **TOLERANCES[dtype])


@pytest.mark.parametrize("seed", [0, 3])
def test_initial_scale_matches_mean_square(rank, seed):
    """initial_scale σ satisfies rank·σ⁴ = mean of X₀² over the M(M−1) ordered pairs i≠j."""
    _, x0 = cooccurrence_matrix(seed=seed)
    sum_of_squares = float((x0.double() ** 2).sum())
    sigma = cooccurrence.initial_scale(sum_of_squares, N_ITEMS, rank)
    assert rank * sigma**4 == pytest.approx(sum_of_squares / (N_ITEMS * (N_ITEMS - 1)), rel=1e-12)


def test_initial_scale_is_positive_for_empty_input():
    """An all-zero X₀ (or a single item) still gives a small positive, finite scale."""
    for n_items in (0, 1, 5):
        sigma = cooccurrence.initial_scale(0.0, n_items, 3)
        assert 0 < sigma < 1e-2


# --- explicit ratings -----------------------------------------------------------------------------


def explicit_batch(n=6, rank=3, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    return draw(n, rank), draw(n, rank), draw(n), draw(n), draw(n) + 3.0


@pytest.mark.parametrize("global_mean", [0.0, 3.5])
def test_predict_matches_loop(global_mean):
    """predict(t) = μ + b_u + b_i + u·v for each aligned row t."""
    users, items, user_bias, item_bias, _ = explicit_batch()
    predicted = explicit.predict(users, items, user_bias, item_bias, global_mean)
    expected = torch.stack(
        [
            global_mean + user_bias[t] + item_bias[t] + sum(users[t, f] * items[t, f] for f in range(3))
            for t in range(len(users))
        ]
    )
    torch.testing.assert_close(predicted, expected)


@pytest.mark.parametrize("regularization", [0.0, 0.1, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_batch_objective_matches_reference(regularization, dtype):
    """batch_objective = Σ_t (r − r̂)² + λ Σ_t (‖u‖² + ‖v‖² + b_u² + b_i²), and the plain SSE."""
    global_mean = 3.5
    users, items, user_bias, item_bias, ratings = explicit_batch(dtype=dtype)
    total, squared_error = explicit.batch_objective(
        users, items, user_bias, item_bias, ratings, global_mean, regularization
    )
    expected_sse = 0.0
    expected_penalty = 0.0
    for t in range(len(ratings)):
        u, v = users[t].double().tolist(), items[t].double().tolist()
        bu, bi, r = float(user_bias[t]), float(item_bias[t]), float(ratings[t])
        error = r - (global_mean + bu + bi + sum(a * b for a, b in zip(u, v, strict=True)))
        expected_sse += error**2
        expected_penalty += sum(a * a for a in u) + sum(b * b for b in v) + bu**2 + bi**2
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    assert float(squared_error) == pytest.approx(expected_sse, rel=rel)
    assert float(total) == pytest.approx(expected_sse + regularization * expected_penalty, rel=rel)


def test_batch_objective_gradient_is_finite_and_correct():
    """Autograd through batch_objective gives finite gradients; for the item bias it is analytic."""
    global_mean, regularization = 3.5, 0.1
    tensors = [t.clone().requires_grad_(True) for t in explicit_batch()]
    users, items, user_bias, item_bias, ratings = tensors
    total, _ = explicit.batch_objective(
        users, items, user_bias, item_bias, ratings.detach(), global_mean, regularization
    )
    total.backward()
    for tensor in (users, items, user_bias, item_bias):
        assert tensor.grad is not None
        assert torch.isfinite(tensor.grad).all()
    with torch.no_grad():
        error = explicit.predict(users, items, user_bias, item_bias, global_mean) - ratings
        torch.testing.assert_close(item_bias.grad, 2 * error + 2 * regularization * item_bias)
        torch.testing.assert_close(users.grad, 2 * error[:, None] * items + 2 * regularization * users)


# --- solvers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("learning_rate", [0.01, 0.3])
def test_adam_step_matches_torch_adam(dtype, learning_rate):
    """optimizer_step carried through its returned state for 5 steps equals torch.optim.Adam."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(5, 4, generator=generator, dtype=torch.float64).to(dtype)
    b = torch.randn(5, 3, generator=generator, dtype=torch.float64).to(dtype)
    start = torch.randn(4, 3, generator=generator, dtype=torch.float64).to(dtype)

    def gradient(p):
        """Gradient of the quadratic ½‖A P − B‖²_F."""
        return a.T @ (a @ p - b)

    param, state = start.clone(), None
    for _ in range(5):
        param, state = optimizer_step(param, gradient(param), state, learning_rate)
        assert param.dtype == dtype and not param.requires_grad

    reference = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([reference], lr=learning_rate)
    for _ in range(5):
        reference.grad = gradient(reference.detach())
        optimizer.step()

    assert not torch.equal(param, start)
    torch.testing.assert_close(
        param, reference.detach(), rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0
    )
    assert int(torch.as_tensor(state[0]["step"])) == 5
    torch.testing.assert_close(state[0]["exp_avg"], optimizer.state[reference]["exp_avg"])
    torch.testing.assert_close(state[0]["exp_avg_sq"], optimizer.state[reference]["exp_avg_sq"])


N_USERS, N_ITEMS_EXPLICIT, RANK = 30, 20, 2
UNRATED_USERS = [3, 17, 29]
UNRATED_ITEMS = [0, 11]


def explicit_problem(seed=0):
    """Ratings from a rank-2 model on a random subset of (user, item) pairs.

    Users UNRATED_USERS and items UNRATED_ITEMS have no ratings at all.
    """
    generator = torch.Generator().manual_seed(seed)
    true_users = torch.randn(N_USERS, RANK, generator=generator)
    true_items = torch.randn(N_ITEMS_EXPLICIT, RANK, generator=generator)
    mask = torch.rand(N_USERS, N_ITEMS_EXPLICIT, generator=generator) < 0.5
    mask[UNRATED_USERS, :] = False
    mask[:, UNRATED_ITEMS] = False
    user_index, item_index = mask.nonzero(as_tuple=True)
    values = (3.0 + (true_users[user_index] * true_items[item_index]).sum(dim=1)).float()
    return user_index, item_index, values


def initial_blocks(seed=1):
    generator = torch.Generator().manual_seed(seed)
    users = RowBlock(torch.randn(N_USERS, RANK, generator=generator) * 0.1, torch.zeros(N_USERS))
    items = RowBlock(
        torch.randn(N_ITEMS_EXPLICIT, RANK, generator=generator) * 0.1,
        torch.zeros(N_ITEMS_EXPLICIT),
    )
    return users, items


def run_passes(n_passes, seed=0, learning_rate=0.05, batch_size=16):
    """Run n_passes of sparse_adam_pass carrying blocks and state; return blocks and objectives."""
    user_index, item_index, values = explicit_problem()
    objective = functools.partial(explicit.batch_objective, global_mean=3.0, regularization=0.01)
    users, items = initial_blocks()
    generator = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(n_passes):
        users, items, total, squared_error = sparse_adam_pass(
            users,
            items,
            user_index,
            item_index,
            values,
            objective,
            learning_rate=learning_rate,
            batch_size=batch_size,
            generator=generator,
            device=torch.device("cpu"),
        )
        history.append((total, squared_error))
    return users, items, history


def test_sparse_adam_pass_decreases_objective():
    """Carrying blocks and optimiser state, the per-pass objective falls pass after pass."""
    users, items, history = run_passes(8)
    totals = [total for total, _ in history]
    errors = [error for _, error in history]
    assert all(later < earlier for earlier, later in itertools.pairwise(totals))
    assert totals[-1] < 0.5 * totals[0]
    assert all(0 < error <= total for total, error in history)
    assert errors[-1] < errors[0]
    assert users.vectors.shape == (N_USERS, RANK) and users.bias.shape == (N_USERS,)
    assert items.vectors.shape == (N_ITEMS_EXPLICIT, RANK) and items.bias.shape == (N_ITEMS_EXPLICIT,)
    assert users.state and items.state


def test_sparse_adam_pass_state_is_carried():
    """The returned state records every step taken so far (it is resumed, not restarted)."""
    user_index, _, _ = explicit_problem()
    batch_size = 16
    steps_per_pass = -(-len(user_index) // batch_size)
    users, items, _ = run_passes(3, batch_size=batch_size)
    for block in (users, items):
        for entry in block.state.values():
            assert int(torch.as_tensor(entry["step"])) == 3 * steps_per_pass


def test_sparse_adam_pass_is_deterministic():
    """The same generator seed gives bit-identical blocks, state and objectives."""
    first = run_passes(3, seed=7)
    second = run_passes(3, seed=7)
    for a, b in zip(first[:2], second[:2], strict=True):
        assert torch.equal(a.vectors, b.vectors)
        assert torch.equal(a.bias, b.bias)
        assert a.state.keys() == b.state.keys()
        for key in a.state:
            for name in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(a.state[key][name], b.state[key][name])
    assert first[2] == second[2]

    other = run_passes(3, seed=8)
    assert not torch.equal(first[0].vectors, other[0].vectors)


def test_sparse_adam_pass_touches_only_indexed_rows():
    """Users and items with no ratings keep their vectors and biases exactly; rated ones move."""
    start_users, start_items = initial_blocks()
    users, items, _ = run_passes(3)
    for start, end, unrated, n in (
        (start_users, users, UNRATED_USERS, N_USERS),
        (start_items, items, UNRATED_ITEMS, N_ITEMS_EXPLICIT),
    ):
        rated = [i for i in range(n) if i not in unrated]
        assert torch.equal(end.vectors[unrated], start.vectors[unrated])
        assert torch.equal(end.bias[unrated], start.bias[unrated])
        assert (end.vectors[rated] != start.vectors[rated]).any(dim=1).all()
        assert (end.bias[rated] != start.bias[rated]).all()
