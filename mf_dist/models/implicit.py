"""Implicit feedback: Hu, Koren & Volinsky (ICDM 2008), confidence-weighted.

For every (user u, item i) pair, preference p_ui = 1 if u liked i else 0, and
confidence c_ui = 1 + α r_ui (r_ui the liked entry's value, 1 for binary
data; c = 1 where nothing was observed). The loss over ALL pairs is

    Σ_{u,i} c_ui (p_ui − x_uᵀy_i)² + λ (‖X‖²_F + ‖Y‖²_F)
    = tr((XᵀX)(YᵀY)) + Σ_liked [c_ui (1 − s_ui)² − s_ui²] + λ(‖X‖² + ‖Y‖²),

s_ui = x_uᵀy_i, so it is computed from the k × k Gram matrices and the liked
entries only, never the dense users × items product. The row update is

    x_u = (YᵀY + Yᵀ(C_u − I)Y + λI)⁻¹ Yᵀ C_u p_u,

solved exactly (Cholesky) or by conjugate gradient without forming the
k × k system per row (Takács et al. 2011). Every function works on one row
block: ``rows`` are local row indices sorted ascending, ``cols`` index the
other side's factors ``col_vectors`` (m × k), ``values`` are r_ui.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mf_dist.solvers import normal_equations


def confidence(values: Tensor, alpha: float) -> Tensor:
    """c = 1 + α r for the liked entries."""
    return 1.0 + alpha * values


def exact_update_rows(
    rows: Tensor,
    cols: Tensor,
    values: Tensor,
    n_rows: int,
    col_vectors: Tensor,
    col_gram: Tensor,
    alpha: float,
    regularization: float,
) -> Tensor:
    """x_u for every row by batched Cholesky; ``col_gram`` is YᵀY of the whole other side (k × k)."""
    rank = col_vectors.shape[1]
    dtype = col_vectors.dtype
    features = col_vectors[cols]
    weights = confidence(values.to(dtype), alpha)
    base = col_gram.to(dtype) + regularization * torch.eye(rank, dtype=dtype, device=col_vectors.device)
    solution = torch.zeros(n_rows, rank, dtype=dtype, device=col_vectors.device)
    for start, stop in normal_equations.row_chunks(n_rows, rank):
        first, last = normal_equations.entry_ranges(rows, start, stop)
        local = rows[first:last] - start
        gram = normal_equations.row_gram_sums(
            local, cols[first:last], col_vectors, stop - start, weights[first:last] - 1
        )
        gram += base
        rhs = normal_equations.row_vector_sums(local, features[first:last], weights[first:last], stop - start)
        solution[start:stop] = normal_equations.solve_normal_equations(gram, rhs)
    return solution


def cg_update_rows(
    rows: Tensor,
    cols: Tensor,
    values: Tensor,
    row_vectors: Tensor,
    col_vectors: Tensor,
    col_gram: Tensor,
    alpha: float,
    regularization: float,
    steps: int,
) -> Tensor:
    """x_u by ``steps`` conjugate-gradient iterations started from the current ``row_vectors`` (n × k)."""
    dtype = col_vectors.dtype
    features = col_vectors[cols]
    weights = confidence(values.to(dtype), alpha)
    gram = col_gram.to(dtype)

    def matvec(x: Tensor) -> Tensor:
        # (YᵀY + λI) x_u + Σ_i (c_ui − 1)(y_iᵀx_u) y_i, without the per-row k × k matrix.
        applied = x @ gram + regularization * x
        along = (x[rows] * features).sum(dim=1) * (weights - 1)
        return applied.index_add_(0, rows, features * along[:, None])

    rhs = normal_equations.row_vector_sums(rows, features, weights, len(row_vectors))
    return normal_equations.conjugate_gradient(matvec, rhs, row_vectors.to(dtype), steps)


def liked_loss_terms(
    rows: Tensor, cols: Tensor, values: Tensor, row_vectors: Tensor, col_vectors: Tensor, alpha: float
) -> Tensor:
    """Σ_liked [c (1 − s)² − s²] for one block's liked entries (float64 scalar)."""
    scores = (row_vectors[rows].double() * col_vectors[cols].double()).sum(dim=1)
    weights = confidence(values.double(), alpha)
    return (weights * (1 - scores) ** 2 - scores**2).sum()


def total_loss(
    row_gram: Tensor, col_gram: Tensor, liked_terms: Tensor, squared_norms: Tensor, regularization: float
) -> Tensor:
    """The full loss from XᵀX, YᵀY (k × k), the liked terms and ‖X‖² + ‖Y‖² (float64)."""
    return (row_gram.double() * col_gram.double()).sum() + liked_terms + regularization * squared_norms


def row_gradient(
    rows: Tensor,
    cols: Tensor,
    values: Tensor,
    row_vectors: Tensor,
    col_vectors: Tensor,
    col_gram: Tensor,
    alpha: float,
    regularization: float,
) -> Tensor:
    """∂loss/∂X for one row block: 2 (X YᵀY + Σ_liked ((c − 1) s − c) y_i + λ X), shape of ``row_vectors``."""
    dtype = row_vectors.dtype
    features = col_vectors[cols].to(dtype)
    scores = (row_vectors[rows] * features).sum(dim=1)
    weights = confidence(values.to(dtype), alpha)
    gradient = row_vectors @ col_gram.to(dtype) + regularization * row_vectors
    gradient = gradient.index_add(0, rows, features * ((weights - 1) * scores - weights)[:, None])
    return 2 * gradient
