"""Non-negative matrix factorization W Hᵀ ≈ X, W, H ≥ 0, under the Frobenius loss.

X is m × n and non-negative: the co-occurrence matrix SᵀS with its diagonal
(items × items, symmetric) or the binary liked matrix S (users × items). W is
m × k and H is stored as rows, n × k, like every other factor table, so the
model is X ≈ W Hᵀ. The loss never needs the dense product:

    ‖X − WHᵀ‖²_F = ‖X‖²_F − 2 tr(Wᵀ X H) + tr((WᵀW)(HᵀH))
    ∂/∂W = 2 (W (HᵀH) − X H)        ∂/∂H = 2 (H (WᵀW) − Xᵀ W)

Both solvers work on one row block W_b given (XH)_b (the block's rows of
X H, a blocked sparse-dense product) and the k × k Gram HᵀH summed over H's
blocks; H is updated the same way with the roles swapped. Every row of W
has the same Hessian 2 HᵀH, so the row blocks are independent given H and a
sweep over W's blocks is exactly one whole-matrix update:

- ``mu``: Lee & Seung's multiplicative update (NIPS 2000),
  W ← W ⊙ (X H) / (W (HᵀH)), which never increases the loss and keeps W ≥ 0;
- ``gradient``: projected gradient (Lin, Neural Computation 2007, with a
  fixed step), W ← max(0, W − η (W (HᵀH) − X H)), η = learning_rate / λ_max(HᵀH).
  The loss's gradient 2 (W HᵀH − XH) is Lipschitz with L = 2 λ_max(HᵀH),
  so the step is learning_rate / L along the full gradient: any
  learning_rate ≤ 2 never increases the loss, and 1 (the default) gives the
  sufficient decrease f(W⁺) ≤ f(W) − λ_max ‖W⁺ − W‖² (Beck & Teboulle 2009,
  Lemma 2.3, for projections onto a convex set).

Grams and loss terms are float64 (the loss is a difference of large terms);
the factors keep their own dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mf_dist.solvers.multiplicative import multiplicative_update
from mf_dist.solvers.rows import random_rows


def initial_scale(mean_value: float, rank: int) -> float:
    """scikit-learn's ``init="random"`` scale sqrt(mean(X) / k).

    With W, H entries ~ scale · |N(0, 1)|, (W Hᵀ)_ij has mean k·scale²·2/π
    = 0.64 mean(X), so the first update starts near the data's magnitude.
    """
    return math.sqrt(max(mean_value, 0.0) / rank)


def initial_factor(n_rows: int, rank: int, scale: float, seed: int) -> Tensor:
    """A fresh non-negative block: scale · |N(0, 1)| (n_rows × rank, float32), from ``seed``."""
    return random_rows(n_rows, rank, scale, seed).abs_()


def multiplicative_rows(factor: Tensor, cross_product: Tensor, other_gram: Tensor) -> Tensor:
    """One Lee–Seung update of a row block: F ⊙ (XH)_b / (F (HᵀH)).

    ``factor`` F is W_b (n × k, ≥ 0), ``cross_product`` (XH)_b (n × k),
    ``other_gram`` HᵀH (k × k). Returns F's shape and dtype. For H pass
    H_c, (XᵀW)_c and WᵀW.
    """
    dtype = factor.dtype
    denominator = factor @ other_gram.to(dtype)
    return multiplicative_update(factor, cross_product.to(dtype), denominator)


def half_gradient(factor: Tensor, cross_product: Tensor, other_gram: Tensor) -> Tensor:
    """½ ∂loss/∂F = F (HᵀH) − (XH)_b for a row block (n × k, F's dtype)."""
    dtype = factor.dtype
    return factor @ other_gram.to(dtype) - cross_product.to(dtype)


def largest_eigenvalue(other_gram: Tensor) -> float:
    """λ_max of a k × k Gram matrix (symmetric, positive semi-definite)."""
    return float(torch.linalg.eigvalsh(other_gram.double())[-1])


def projected_gradient_rows(
    factor: Tensor, cross_product: Tensor, other_gram: Tensor, learning_rate: float
) -> Tensor:
    """max(0, F − (learning_rate / λ_max(HᵀH)) (F (HᵀH) − (XH)_b)): one projected step.

    Shapes as :func:`multiplicative_rows`. When HᵀH is zero the loss does not
    depend on F, and F is returned unchanged.
    """
    curvature = largest_eigenvalue(other_gram)
    if curvature <= 0:
        return factor.clone()
    step = learning_rate / curvature
    return (factor - step * half_gradient(factor, cross_product, other_gram)).clamp_min(0)


def block_inner(factor: Tensor, cross_product: Tensor) -> Tensor:
    """⟨F_b, (XH)_b⟩: the block's share of tr(Wᵀ X H) (float64 scalar)."""
    return (factor.double() * cross_product.double()).sum()


def total_loss(squared_norm: float, inner: Tensor, row_gram: Tensor, col_gram: Tensor) -> Tensor:
    """‖X − WHᵀ‖²_F = ‖X‖² − 2 tr(WᵀXH) + ⟨WᵀW, HᵀH⟩ from the block sums (float64 scalar)."""
    return squared_norm - 2 * inner.double() + (row_gram.double() * col_gram.double()).sum()
