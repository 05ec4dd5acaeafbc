"""Explicit ratings: r̂_ui = μ + b_u + b_i + u_uᵀ v_i, fitted on observed ratings only.

The objective per observed rating is

    (r_ui − r̂_ui)² + λ (‖u_u‖² + ‖v_i‖² + b_u² + b_i²)

so a user or item is regularised in proportion to its number of ratings
(the weighted-λ scheme of Zhou et al., 2008). Only the gathered rows of U and
V for a batch of ratings are ever multiplied: never the dense U Vᵀ.
"""

from __future__ import annotations

from torch import Tensor


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
