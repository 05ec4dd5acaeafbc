"""Implicit feedback: Hu, Koren & Volinsky (ICDM 2008), confidence-weighted.

For every (user u, item i) pair, preference p_ui = 1 if u liked i else 0, and
confidence c_ui = 1 + α w_ui, w_ui a function of the liked entry's value r_ui
(:func:`confidence_weights`: 1 for ``binary``, r_ui for ``linear``,
log(1 + r_ui/ε) for Hu et al.'s ``log`` form; c = 1 where nothing was
observed). The loss over ALL pairs is

    Σ_{u,i} c_ui (p_ui − x_uᵀy_i)² + λ (‖X‖²_F + ‖Y‖²_F)
    = tr((XᵀX)(YᵀY)) + Σ_liked [c_ui (1 − s_ui)² − s_ui²] + λ(‖X‖² + ‖Y‖²),

s_ui = x_uᵀy_i, so it is computed from the k × k Gram matrices and the liked
entries only, never the dense users × items product. The row update is

    x_u = (YᵀY + Yᵀ(C_u − I)Y + λI)⁻¹ Yᵀ C_u p_u,

solved exactly (Cholesky) or by conjugate gradient without forming the
k × k system per row (Takács et al. 2011). Every function works on one row
block: ``rows`` are local row indices sorted ascending, ``cols`` index the
other side's factors ``col_vectors`` (m × k), ``values`` are the confidence
weights w_ui = (c_ui − 1)/α. The callers turn the entries' values r_ui into
w_ui once, by :func:`confidence_weights` with the run's ``confidence``
setting, so the solves, the gradient and the loss all see the same c.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mf_dist.solvers import normal_equations, weighted_cg, weighted_cholesky
from mf_dist.solvers.rows import gram

if TYPE_CHECKING:
    from mf_dist.settings import ConfidenceName


def confidence_weights(values: Tensor, mode: ConfidenceName = "linear", epsilon: float = 1.0) -> Tensor:
    """w = (c − 1)/α of the liked entries from their values r (same shape and dtype).

    ``binary``: w = 1, whatever r (the value only decided that the entry is
    liked); ``linear``: w = r; ``log``: w = log(1 + r/ε) (Hu, Koren &
    Volinsky 2008, eq. 6), r below 0 counting as 0 so that c stays ≥ 1.
    """
    if mode == "binary":
        return torch.ones_like(values)
    if mode == "linear":
        return values
    if mode == "log":
        return torch.log1p(values.clamp_min(0) / epsilon)
    raise ValueError(f"unknown confidence {mode!r}; choose binary, linear or log")


def confidence(values: Tensor, alpha: float, mode: ConfidenceName = "linear", epsilon: float = 1.0) -> Tensor:
    """c = 1 + α w(r) for the liked entries' values r, w by :func:`confidence_weights`.

    The functions below take ``values`` already turned into w and call this
    with the default ``linear`` mode, which leaves them as they are.
    """
    return 1.0 + alpha * confidence_weights(values, mode, epsilon)


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
    """x_u for every row, exactly (Cholesky); ``col_gram`` is YᵀY of the whole other side (k × k)."""
    rank = col_vectors.shape[1]
    dtype = col_vectors.dtype
    weights = confidence(values.to(dtype), alpha)
    base = col_gram.to(dtype) + regularization * torch.eye(rank, dtype=dtype, device=col_vectors.device)
    no_ridge = torch.zeros(n_rows, dtype=dtype, device=col_vectors.device)
    return weighted_cholesky.cholesky_rows(
        rows, cols, weights - 1, weights, no_ridge, col_vectors, base, n_rows
    )


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
) -> tuple[Tensor, Tensor]:
    """x_u by ``steps`` conjugate-gradient iterations started from the current ``row_vectors`` (n × k).

    ``rows`` (e,) int64 sorted ascending, ``cols`` (e,) int64 into ``col_vectors``
    (m × k), ``values`` (e,) the weights w_ui; ``col_gram`` YᵀY (k × k). Computes in
    ``col_vectors``' dtype (float32 in training, float64 in the tests).

    Returns the new rows (n × k) and the scores s_ui = x_uᵀy_i at them (e,),
    in entry order, for :func:`liked_terms_from_scores`. The system of row u is
    A_u = YᵀY + λI + Σ_liked (c_ui − 1) y_i y_iᵀ, b_u = Σ_liked c_ui y_i (p_u is 1
    exactly on the liked entries), solved by :func:`mf_dist.solvers.weighted_cg.cg_rows`
    without forming A_u.
    """
    dtype = col_vectors.dtype
    weights = confidence(values.to(dtype), alpha)
    base = col_gram.to(dtype) + regularization * torch.eye(
        col_gram.shape[0], dtype=dtype, device=col_vectors.device
    )
    crow = normal_equations.row_pointers(rows, len(row_vectors))
    return weighted_cg.cg_rows(
        crow, cols, weights - 1, weights, row_vectors.to(dtype), col_vectors.to(dtype), base, steps
    )


def liked_loss_terms(
    rows: Tensor, cols: Tensor, values: Tensor, row_vectors: Tensor, col_vectors: Tensor, alpha: float
) -> Tensor:
    """Σ_liked [c (1 − s)² − s²] for one block's liked entries (float64 scalar).

    ``rows`` (e,) sorted ascending into ``row_vectors`` (n × k), ``cols`` (e,)
    into ``col_vectors`` (m × k). The scores come from one SDDMM in the
    factors' own dtype (the e × k gathers are never made) and are summed in
    float64. Float32 scores are off by ~1e-7 relative, which moves the loss by
    far less than its float64 sum of ~10⁶ terms needs to stay exact; converting
    the whole other side to float64 for every block cost more than the solve.
    """
    dtype = torch.promote_types(row_vectors.dtype, col_vectors.dtype)
    x, y = row_vectors.to(dtype), col_vectors.to(dtype)
    ones = torch.ones(len(rows), dtype=dtype, device=x.device)
    pattern = normal_equations.csr_matrix(rows, cols, ones, len(x), len(y))
    return liked_terms_from_scores(normal_equations.sampled_row_dots(pattern, x, y), values, alpha)


def liked_terms_from_scores(scores: Tensor, values: Tensor, alpha: float) -> Tensor:
    """Σ_liked [c (1 − s)² − s²] from the scores s (e,) and weights w (e,) of the liked entries (float64)."""
    scores = scores.double()
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


def fold_in_rows(
    rows: Tensor,
    cols: Tensor,
    values: Tensor,
    n_rows: int,
    col_vectors: Tensor,
    col_bias: Tensor | None,
    global_mean: float,
    hyperparameters: dict,
) -> tuple[Tensor, None]:
    """New users' vectors against fixed items: the exact ALS user half-step (no biases).

    :func:`exact_update_rows` with YᵀY of all the items and the run's
    ``alpha``, ``confidence``, ``confidence_epsilon`` and ``regularization``;
    ``values`` are the liked entries' r_ui. A manifest written before the
    confidence setting existed has none: those runs trained with ``linear``.
    """
    weights = confidence_weights(
        values,
        hyperparameters.get("confidence", "linear"),
        float(hyperparameters.get("confidence_epsilon", 1.0)),
    )
    return (
        exact_update_rows(
            rows,
            cols,
            weights,
            n_rows,
            col_vectors,
            gram(col_vectors),
            float(hyperparameters["alpha"]),
            float(hyperparameters["regularization"]),
        ),
        None,
    )
