"""Symmetric co-occurrence embedding: min_V Σ_{i≠j} (v_iᵀ v_j − X_ij)², zeros included.

V is M × k (one row per item), X = SᵀS is symmetric and X₀ is X with its
diagonal removed. The all-pairs sum never needs an M × M matrix:

    Σ_{i≠j} (v_iᵀv_j)²      = ‖G‖²_F − Σ_i ‖v_i‖⁴,   G = VᵀV  (k × k)
    Σ_{i≠j} X_ij v_iᵀv_j    = Σ_i v_iᵀ (X₀V)_i
    loss = ‖G‖²_F − Σ_i ‖v_i‖⁴ − 2 Σ_i v_iᵀ(X₀V)_i + ‖X₀‖²_F
    ∂loss/∂V = 4 (V G − diag(‖v_i‖²) V − X₀ V)

Every function here works on one row block V_b (rows of V) and the matching
rows (X₀V)_b, given the global G; sums over blocks give the whole. The loss
is accumulated in float64: it is a difference of large terms.

Alternating least squares (:func:`als_block_update`): with every other row
fixed, row i's part of the loss is 2 Σ_{j≠i} (v_jᵀv_i − X_ij)², a linear
least-squares problem in v_i with normal equations

    (G − v_i v_iᵀ) v_i = (X₀V)_i,   G − v_i v_iᵀ = Σ_{j≠i} v_j v_jᵀ.

Rows of one block are solved at once (Jacobi within the block), which alone
may overshoot: two rows of a block each move to their best place given the
other's old place. The block's share of the loss along V_b + t D is a
quartic in t, so an exact line search over t ∈ [0, 1] (t = 1 is the plain
ALS step, t = 0 no change) makes every block step non-increasing. Blocks are
visited in turn (Gauss–Seidel), each with G and X₀V refreshed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mf_dist.solvers import normal_equations


def tile_products(
    tile: Tensor, tile_transposed: Tensor | None, row_vectors: Tensor, col_vectors: Tensor
) -> tuple[Tensor, Tensor]:
    """Both products of an off-diagonal-free tile X₀_bc (B_b × B_c) with the factors.

    Returns ``(X₀_bc V_c, X₀_bcᵀ V_b)``, shapes B_b × k and B_c × k. ``tile``
    may be dense or sparse CSR; for a sparse tile pass its transpose as CSR
    too (a CSC product is an order of magnitude slower), for a dense one
    ``None``.
    """
    dtype = row_vectors.dtype
    forward = tile.to(dtype) @ col_vectors
    transposed = tile.T if tile_transposed is None else tile_transposed
    backward = transposed.to(dtype) @ row_vectors
    return forward, backward


def block_loss_terms(vectors: Tensor, cross_product: Tensor) -> tuple[Tensor, Tensor]:
    """The block's share of Σ_i ‖v_i‖⁴ and of Σ_i v_iᵀ(X₀V)_i (float64 scalars).

    ``cross_product`` is (X₀V)_b, the block's rows of X₀V (n × k).
    """
    v = vectors.double()
    squared_norms = (v * v).sum(dim=1)
    return (squared_norms**2).sum(), (v * cross_product.double()).sum()


def total_loss(
    gram_matrix: Tensor, sum_fourth_powers: Tensor, cross: Tensor, offdiagonal_sum_of_squares: float
) -> Tensor:
    """Σ_{i≠j} (v_iᵀv_j − X_ij)² from the block sums (float64 scalar)."""
    return (gram_matrix.double() ** 2).sum() - sum_fourth_powers - 2 * cross + offdiagonal_sum_of_squares


def block_gradient(vectors: Tensor, gram_matrix: Tensor, cross_product: Tensor) -> Tensor:
    """∂loss/∂V_b = 4 (V_b G − diag(‖v_i‖²) V_b − (X₀V)_b), same shape and dtype as V_b."""
    g = gram_matrix.to(vectors.dtype)
    squared_norms = (vectors * vectors).sum(dim=1, keepdim=True)
    return 4 * (vectors @ g - squared_norms * vectors - cross_product.to(vectors.dtype))


def initial_scale(offdiagonal_sum_of_squares: float, n_items: int, rank: int) -> float:
    """Std of the random start so that E[(v_iᵀv_j)²] equals the mean X_ij² over pairs.

    With v entries ~ N(0, σ²), E[(v_iᵀv_j)²] = k σ⁴.
    """
    pairs = max(1, n_items * (n_items - 1))
    mean_square = offdiagonal_sum_of_squares / pairs
    return max(mean_square / rank, 1e-12) ** 0.25


def als_rows(vectors: Tensor, gram_matrix: Tensor, cross_product: Tensor, relative_ridge: float) -> Tensor:
    """Each row's least-squares solution with every other row of V fixed (float64, n × k).

    Solves (G − v_i v_iᵀ + ρ I) v_i' = (X₀V)_i for every row i of the block
    ``vectors`` (n × k), where ``gram_matrix`` is G = VᵀV over all rows
    (k × k, including this block's current rows) and ``cross_product`` is
    (X₀V)_b at the current V. ρ = ``relative_ridge`` · tr(G) / k only keeps
    near-singular systems (fewer than k informative other rows) solvable; at
    0 the solution is the row's exact least-squares fit.
    """
    v = vectors.double()
    g = gram_matrix.to(device=v.device, dtype=torch.float64)
    rhs = cross_product.double()
    rank = v.shape[1]
    base = g + relative_ridge * float(torch.trace(g)) / rank * torch.eye(rank, dtype=g.dtype, device=g.device)
    solution = torch.empty_like(v)
    # row_chunks budgets float32 systems; these are float64.
    budget = normal_equations.DEFAULT_BUDGET_BYTES // 2
    for start, stop in normal_equations.row_chunks(len(v), rank, budget):
        rows = v[start:stop]
        systems = base - rows.unsqueeze(2) * rows.unsqueeze(1)
        solution[start:stop] = normal_equations.solve_normal_equations(systems, rhs[start:stop])
    return solution


def block_objective(
    vectors: Tensor, diagonal_product: Tensor, other_gram: Tensor, external_cross: Tensor
) -> Tensor:
    """The part of the loss that depends on row block V_b when every other row is fixed (float64).

        L_b = ‖G_b‖² + 2 ⟨G_b, G_o⟩ − Σ_{i∈b} ‖v_i‖⁴ − 2 tr(V_bᵀ X₀_bb V_b) − 4 tr(V_bᵀ E_b)

    with G_b = V_bᵀV_b, ``other_gram`` G_o = Σ_{c≠b} V_cᵀV_c (k × k),
    ``diagonal_product`` X₀_bb V_b and ``external_cross`` E_b = Σ_{c≠b} X₀_bc V_c
    (both n × k). The full loss is L_b plus terms free of V_b.
    """
    v = vectors.double()
    own = v.T @ v
    squared_norms = (v * v).sum(dim=1)
    return (
        (own * own).sum()
        + 2 * (own * other_gram.double()).sum()
        - (squared_norms**2).sum()
        - 2 * (v * diagonal_product.double()).sum()
        - 4 * (v * external_cross.double()).sum()
    )


def line_search_polynomial(
    vectors: Tensor,
    direction: Tensor,
    gram_matrix: Tensor,
    cross_product: Tensor,
    diagonal_direction_product: Tensor,
) -> Tensor:
    """Coefficients (p1, p2, p3, p4) of L_b(V_b + tD) − L_b(V_b) = p1 t + p2 t² + p3 t³ + p4 t⁴.

    ``gram_matrix`` is G over all rows at the current V_b, ``cross_product``
    (X₀V)_b at the current V, ``diagonal_direction_product`` X₀_bb D (float64).
    With S = V_bᵀD + DᵀV_b, Q = DᵀD, a_i = ‖v_i‖², c_i = v_iᵀd_i, e_i = ‖d_i‖²:

        p1 = 2⟨S, G⟩ − 4 Σ a_i c_i − 4 ⟨D, (X₀V)_b⟩           (the directional derivative)
        p2 = ‖S‖² + 2⟨Q, G⟩ − 4 Σ c_i² − 2 Σ a_i e_i − 2 ⟨D, X₀_bb D⟩
        p3 = 2⟨S, Q⟩ − 4 Σ c_i e_i
        p4 = ‖Q‖² − Σ e_i² = Σ_{i≠j∈b} (d_iᵀd_j)² ≥ 0
    """
    v, d = vectors.double(), direction.double()
    g = gram_matrix.double()
    mixed = v.T @ d
    s = mixed + mixed.T
    q = d.T @ d
    a = (v * v).sum(dim=1)
    c = (v * d).sum(dim=1)
    e = (d * d).sum(dim=1)
    p1 = 2 * (s * g).sum() - 4 * (a * c).sum() - 4 * (d * cross_product.double()).sum()
    p2 = (
        (s * s).sum()
        + 2 * (q * g).sum()
        - 4 * (c * c).sum()
        - 2 * (a * e).sum()
        - 2 * (d * diagonal_direction_product.double()).sum()
    )
    p3 = 2 * (s * q).sum() - 4 * (c * e).sum()
    p4 = (q * q).sum() - (e * e).sum()
    return torch.stack([p1, p2, p3, p4])


def quartic_minimizer(coefficients: Tensor) -> float:
    """argmin over t ∈ [0, 1] of p1 t + p2 t² + p3 t³ + p4 t⁴; 0 when nothing in (0, 1] lowers it."""
    p1, p2, p3, p4 = (float(x) for x in coefficients)
    candidates = [1.0]
    # Stationary points: the real roots of the cubic derivative inside (0, 1).
    for root in np.roots([4 * p4, 3 * p3, 2 * p2, p1]):
        if abs(root.imag) < 1e-12 and 0.0 < root.real < 1.0:
            candidates.append(float(root.real))
    best, best_value = 0.0, 0.0
    for t in candidates:
        value = ((p4 * t + p3) * t + p2) * t * t + p1 * t
        if value < best_value:
            best, best_value = t, value
    return best


def als_block_update(
    vectors: Tensor,
    gram_matrix: Tensor,
    external_cross: Tensor,
    diagonal_tile: Tensor | None,
    relative_ridge: float,
) -> tuple[Tensor, float, float]:
    """One Gauss–Seidel block step: ALS rows, exact line search, never a higher loss.

    ``vectors`` V_b (n × k, any float dtype), ``gram_matrix`` G over all rows
    at the current V (k × k), ``external_cross`` E_b = Σ_{c≠b} X₀_bc V_c
    (n × k), ``diagonal_tile`` X₀_bb (n × n, dense or sparse CSR, symmetric,
    zero diagonal; ``None`` for an all-zero tile). Returns the new V_b in
    ``vectors``' dtype, the exact change of the loss at that stored value
    (≤ 0) and the step t taken. Should rounding to the storage dtype undo a
    tiny improvement, the block is left as it was.
    """
    v = vectors.double()
    external = external_cross.to(device=v.device, dtype=torch.float64)

    def diagonal_product(matrix: Tensor) -> Tensor:
        if diagonal_tile is None:
            return torch.zeros_like(matrix)
        return diagonal_tile.to(torch.float64) @ matrix

    g = gram_matrix.to(device=v.device, dtype=torch.float64)
    others = g - v.T @ v
    own_product = diagonal_product(v)
    cross = external + own_product
    direction = als_rows(v, g, cross, relative_ridge) - v
    coefficients = line_search_polynomial(v, direction, g, cross, diagonal_product(direction))
    step = quartic_minimizer(coefficients)
    if step == 0.0:
        return vectors.clone(), 0.0, 0.0
    candidate = (v + step * direction).to(vectors.dtype)
    stored = candidate.double()
    before = block_objective(v, own_product, others, external)
    after = block_objective(stored, diagonal_product(stored), others, external)
    change = float(after - before)
    if not change <= 0.0:
        return vectors.clone(), 0.0, 0.0
    return candidate, change, step
