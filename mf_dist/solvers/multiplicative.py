"""Multiplicative updates for non-negative factors (Lee & Seung, NIPS 2000).

For a loss whose gradient splits into a non-negative positive part P and a
non-negative negative part N, ∇ = P − N, the update F ← F ⊙ N / P keeps every
entry of F non-negative and, for the Frobenius NMF loss, never increases it
(Lee & Seung, "Algorithms for Non-negative Matrix Factorization", NIPS 13,
2001, Theorem 1). The same rule with the beta-divergence generalisation is
scikit-learn's ``solver="mu"`` (Févotte & Idier, Neural Computation 2011).
"""

from __future__ import annotations

import torch
from torch import Tensor

# scikit-learn's guard (``sklearn.decomposition._nmf.EPSILON``): the float32
# machine epsilon, used whatever the dtype. It only replaces denominators that
# are exactly zero, it is not added to every denominator, so the update is the
# textbook one wherever it is defined.
EPSILON = float(torch.finfo(torch.float32).eps)


def multiplicative_update(factor: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    """``factor ⊙ numerator / denominator`` with exact-zero denominators replaced by :data:`EPSILON`.

    All three have the same shape (rows × k) and dtype; ``factor`` and
    ``numerator`` must be non-negative. A zero denominator only occurs where
    the factor's entry or the whole matching column of the other factor is
    zero, and then the numerator is zero too, so the entry becomes (stays) 0
    rather than NaN, as in scikit-learn's ``_multiplicative_update_w/_h``.
    """
    safe = torch.where(denominator == 0, torch.full_like(denominator, EPSILON), denominator)
    return factor * (numerator / safe)
