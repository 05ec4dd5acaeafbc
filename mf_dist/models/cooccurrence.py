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
"""

from __future__ import annotations

from torch import Tensor


def gram(vectors: Tensor) -> Tensor:
    """VᵀV of a row block (n × k → k × k), in float64 so that block sums stay exact."""
    v = vectors.double()
    return v.T @ v


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
