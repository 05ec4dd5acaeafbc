"""Explicit ratings: r̂_ui = μ + b_u + b_i + u_uᵀ v_i, fitted on observed ratings only.

The objective per observed rating is

    (r_ui − r̂_ui)² + λ (‖u_u‖² + ‖v_i‖² + b_u² + b_i²)

so a user or item is regularised in proportion to its number of ratings
(the weighted-λ scheme of Zhou et al., 2008). Only the gathered rows of U and
V for a batch of ratings are ever multiplied: never the dense U Vᵀ.

Two solvers use this objective: mini-batch gradient steps on
:func:`batch_objective`, and ALS, whose half-step :func:`als_update_rows` is
the exact minimiser of the same objective over one side.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mf_dist.solvers import normal_equations, weighted_cholesky


def predict(
    user_vectors: Tensor, item_vectors: Tensor, user_bias: Tensor, item_bias: Tensor, global_mean: float
) -> Tensor:
    """Predicted ratings for aligned rows: (n × k, n × k, n, n) → n."""
    return global_mean + user_bias + item_bias + (user_vectors * item_vectors).sum(dim=1)


def batch_objective(
    user_vectors: Tensor,
    item_vectors: Tensor,
    user_bias: Tensor,
    item_bias: Tensor,
    ratings: Tensor,
    global_mean: float,
    regularization: float,
) -> tuple[Tensor, Tensor]:
    """Summed objective and summed squared error over a batch of n ratings.

    Rows are aligned: row t holds the user and item of rating t.
    """
    error = predict(user_vectors, item_vectors, user_bias, item_bias, global_mean) - ratings
    squared_error = (error * error).sum()
    penalty = (
        (user_vectors * user_vectors).sum()
        + (item_vectors * item_vectors).sum()
        + (user_bias * user_bias).sum()
        + (item_bias * item_bias).sum()
    )
    return squared_error + regularization * penalty, squared_error


def block_objective(
    rows: Tensor,
    cols: Tensor,
    ratings: Tensor,
    row_vectors: Tensor,
    col_vectors: Tensor,
    row_bias: Tensor,
    col_bias: Tensor,
    global_mean: float,
    regularization: float,
) -> tuple[Tensor, Tensor]:
    """:func:`batch_objective` over one block's entries, without gathering k-vectors per entry.

    ``rows`` (e,) int64 sorted ascending index ``row_vectors`` (n × k) and
    ``row_bias`` (n); ``cols`` (e,) index ``col_vectors`` (m × k) and
    ``col_bias`` (m); ``ratings`` (e,). The dot products are an SDDMM on the
    entries' CSR pattern and each penalty is a row's squared norm times its
    entry count, so the cost is O(e·k) arithmetic with no e × k tensor
    (gathering both sides in float64 cost more than the ALS solve itself).
    Returns (objective, squared error) as float64 scalars.
    """
    x, y = row_vectors.double(), col_vectors.double()
    pattern = normal_equations.csr_matrix(
        rows, cols, torch.zeros(len(rows), dtype=x.dtype, device=x.device), len(x), len(y)
    )
    scores = normal_equations.sampled_row_dots(pattern, x, y)
    error = global_mean + row_bias.double()[rows] + col_bias.double()[cols] + scores - ratings.double()
    squared_error = (error * error).sum()
    row_counts = torch.bincount(rows, minlength=len(x)).double()
    col_counts = torch.bincount(cols, minlength=len(y)).double()
    penalty = row_counts @ ((x * x).sum(dim=1) + row_bias.double() ** 2) + col_counts @ (
        (y * y).sum(dim=1) + col_bias.double() ** 2
    )
    return squared_error + regularization * penalty, squared_error


def als_update_rows(
    rows: Tensor,
    cols: Tensor,
    ratings: Tensor,
    n_rows: int,
    col_vectors: Tensor,
    col_bias: Tensor,
    global_mean: float,
    regularization: float,
) -> tuple[Tensor, Tensor]:
    """The exact least-squares rows of one side, the other side fixed (one ALS half-step).

    For each row r (a user, or an item when the roles are swapped) with
    observed entries (r, c, x): minimise Σ_c (x − μ − b_c − b_r − w_rᵀ v_c)²
    + λ n_r (‖w_r‖² + b_r²), i.e. solve ([V 1]ᵀ[V 1] + λ n_r I) [w_r; b_r] =
    [V 1]ᵀ (x − μ − b_c). ``rows`` (e,) int64 local row indices sorted
    ascending, ``cols`` (e,) int64 indices into ``col_vectors`` (m × k) and
    ``col_bias`` (m), ``ratings`` (e,). Returns vectors (n_rows × k) and
    biases (n_rows); a row with no entries gets zeros.
    """
    rank = col_vectors.shape[1]
    dtype, device = col_vectors.dtype, col_vectors.device
    ones = torch.ones(len(col_vectors), 1, dtype=dtype, device=device)
    col_features = torch.cat([col_vectors, ones], dim=1)
    targets = ratings.to(dtype) - global_mean - col_bias.to(dtype)[cols]
    ridge = regularization * torch.bincount(rows, minlength=n_rows).to(dtype).clamp_min(1.0)
    no_base = torch.zeros(rank + 1, rank + 1, dtype=dtype, device=device)
    solution = weighted_cholesky.cholesky_rows(
        rows, cols, None, targets, ridge, col_features, no_base, n_rows
    )
    return solution[:, :rank].contiguous(), solution[:, rank].contiguous()


def cg_update_rows(
    rows: Tensor,
    cols: Tensor,
    ratings: Tensor,
    row_vectors: Tensor,
    row_bias: Tensor,
    col_vectors: Tensor,
    col_bias: Tensor,
    global_mean: float,
    regularization: float,
    steps: int,
) -> tuple[Tensor, Tensor]:
    """The same half-step as :func:`als_update_rows`, by ``steps`` conjugate-gradient iterations.

    Started from the current rows (``row_vectors`` n × k, ``row_bias`` n),
    as Takács et al. (2011) do for implicit feedback; the other arguments are
    those of :func:`als_update_rows`. With f_c = [v_c; 1], every matvec
    A_r z_r = Σ_c f_c (f_cᵀ z_r) + λ n_r z_r is one SDDMM and one CSR × dense
    product on the block's pattern, e·(k + 1) multiply-adds each, where the
    exact solve assembles e·(k + 1)² for the systems and then factors them.
    k + 1 steps reach the exact solution; a few, warm-started every epoch,
    reach the same held-out error.
    """
    dtype = col_vectors.dtype
    device = col_vectors.device
    n_rows, n_cols = len(row_vectors), len(col_vectors)
    features = torch.cat([col_vectors, torch.ones(n_cols, 1, dtype=dtype, device=device)], dim=1)
    start = torch.cat([row_vectors.to(dtype), row_bias.to(dtype)[:, None]], dim=1)
    targets = ratings.to(dtype) - global_mean - col_bias.to(dtype)[cols]
    ridge = regularization * torch.bincount(rows, minlength=n_rows).to(dtype).clamp_min(1.0)
    pattern = normal_equations.csr_matrix(rows, cols, targets, n_rows, n_cols)
    rhs = pattern @ features
    # Buffers reused by every matvec (see mf_dist.models.implicit.cg_update_rows).
    sampled = pattern.clone()
    applied = torch.empty(n_rows, features.shape[1], dtype=dtype, device=device)

    def matvec(z: Tensor) -> Tensor:
        torch.sparse.sampled_addmm(pattern, z, features.T, beta=0.0, out=sampled)
        torch.mm(sampled, features, out=applied)
        return applied.addcmul_(ridge[:, None], z)

    solution = normal_equations.conjugate_gradient(matvec, rhs, start, steps)
    rank = col_vectors.shape[1]
    return solution[:, :rank].contiguous(), solution[:, rank].contiguous()


def fold_in_rows(
    rows: Tensor,
    cols: Tensor,
    values: Tensor,
    n_rows: int,
    col_vectors: Tensor,
    col_bias: Tensor | None,
    global_mean: float,
    hyperparameters: dict,
) -> tuple[Tensor, Tensor | None]:
    """New users' vectors and biases against fixed items: the exact ALS user half-step.

    :func:`als_update_rows` with the run's ``regularization`` (weighted-λ), the
    same solve as training's; ``col_bias`` is required.
    """
    assert col_bias is not None, "the explicit model's items carry biases"
    return als_update_rows(
        rows,
        cols,
        values,
        n_rows,
        col_vectors,
        col_bias,
        global_mean,
        float(hyperparameters["regularization"]),
    )
