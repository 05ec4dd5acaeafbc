"""Weighted co-occurrence embedding over the non-zeros of X (GloVe / Swivel style).

    loss = Σ_{i≠j, X_ij > 0} f(X_ij) (v_iᵀv_j − t_ij)²,
    f(x) = min(1, (x / x_max)^power),   t = log X (``log_target``) or X

The weighting function and the log target are GloVe's (Pennington, Socher &
Manning, EMNLP 2014); fitting only the observed pairs, with the same V on both
sides of a symmetric X, is the positive part of Swivel (Shazeer et al. 2016).
Unlike the all-pairs squared loss (:mod:`mf_dist.models.cooccurrence`), the
zeros of X carry no weight, so both loss and gradient are sums over the
stored entries of each tile and cost O(nnz · k).

A tile X₀_bc (b ≤ c) stands for itself and, off the diagonal, for its
transpose; ``multiplicity`` (1 on the diagonal, 2 off it) counts that. For
entry (i, j) with residual e = v_iᵀv_j − t and ordered-pair weight f,
∂/∂v_i = 2 f e v_j and ∂/∂v_j = 2 f e v_i, each times the multiplicity. A
diagonal tile holds both (i, j) and (j, i), so the sum over its entries
already counts each unordered pair twice.

Every function takes one tile's data and the two row blocks it joins; the
loss comes back in float64, the gradients in the factors' dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Entries whose rows are gathered at once: 8 Mi floats of gathered vectors
# (64 MiB in float32, per side) bound a sparse tile's working memory.
GATHER_BUDGET_FLOATS = 8 * 1024 * 1024


def weights(counts: Tensor, x_max: float, power: float) -> Tensor:
    """f(x) = min(1, (x / x_max)^power) elementwise; 0 where x = 0 (same shape and dtype)."""
    return torch.where(counts > 0, (counts / x_max).pow(power).clamp(max=1.0), torch.zeros_like(counts))


def targets(counts: Tensor, log_target: bool) -> Tensor:
    """t = log x or x where x > 0, and 0 where x = 0 (never log 0)."""
    if not log_target:
        return torch.where(counts > 0, counts, torch.zeros_like(counts))
    return torch.where(counts > 0, counts.clamp_min(1e-30).log(), torch.zeros_like(counts))


def sparse_tile_terms(
    rows: Tensor,
    cols: Tensor,
    weight: Tensor,
    target: Tensor,
    row_vectors: Tensor,
    col_vectors: Tensor,
    multiplicity: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss share and gradients of a tile stored as its non-zero entries.

    ``rows``/``cols`` (e, int64) index ``row_vectors`` V_b (B_b × k) and
    ``col_vectors`` V_c (B_c × k); ``weight`` f and ``target`` t are (e,).
    Returns (loss float64 scalar, ∂/∂V_b (B_b × k), ∂/∂V_c (B_c × k)). The
    rows are gathered in chunks of :data:`GATHER_BUDGET_FLOATS`.
    """
    dtype = row_vectors.dtype
    rank = row_vectors.shape[1]
    loss = torch.zeros((), dtype=torch.float64, device=row_vectors.device)
    row_gradient = torch.zeros_like(row_vectors)
    col_gradient = torch.zeros_like(col_vectors)
    step = max(1, GATHER_BUDGET_FLOATS // max(1, rank))
    for start in range(0, len(rows), step):
        r, c = rows[start : start + step], cols[start : start + step]
        f, t = weight[start : start + step].to(dtype), target[start : start + step].to(dtype)
        left, right = row_vectors[r], col_vectors[c]
        residual = (left * right).sum(dim=1) - t
        loss += (f.double() * residual.double() ** 2).sum()
        scaled = (2 * multiplicity) * f * residual
        row_gradient.index_add_(0, r, right * scaled[:, None])
        col_gradient.index_add_(0, c, left * scaled[:, None])
    return multiplicity * loss, row_gradient, col_gradient


def dense_tile_terms(
    weight: Tensor, target: Tensor, row_vectors: Tensor, col_vectors: Tensor, multiplicity: int
) -> tuple[Tensor, Tensor, Tensor]:
    """As :func:`sparse_tile_terms` for a dense tile: ``weight`` and ``target`` are B_b × B_c.

    ``weight`` is zero wherever X is (including a diagonal tile's diagonal),
    which masks those pairs out of the loss and the gradients.
    """
    dtype = row_vectors.dtype
    f = weight.to(dtype)
    residual = row_vectors @ col_vectors.T - target.to(dtype)
    weighted = f * residual
    loss = multiplicity * (weighted.double() * residual.double()).sum()
    scaled = (2 * multiplicity) * weighted
    return loss, scaled @ col_vectors, scaled.T @ row_vectors


def initial_scale(sum_of_squared_targets: float, n_entries: int, rank: int) -> float:
    """Std σ of a random start with E[(v_iᵀv_j)²] = k σ⁴ equal to the mean t² over the non-zeros."""
    mean_square = sum_of_squared_targets / max(1, n_entries)
    return max(mean_square / rank, 1e-12) ** 0.25
