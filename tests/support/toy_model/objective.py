"""The worked example's objective (docs/architecture.md): plain least squares on observed ratings.

L(U, V) = ½ Σ_{(u,i) observed} (r_ui − u·v_i)² + ½ λ (‖U‖² + ‖V‖²)

Pure torch on whole tables, as a math module is: no Dask, no I/O.
"""

from __future__ import annotations

import torch
from torch import Tensor


def loss_and_gradients(
    users: Tensor, items: Tensor, rows: Tensor, cols: Tensor, ratings: Tensor, regularization: float
) -> tuple[float, Tensor, Tensor]:
    """L and its gradients for U (n_users × k) and V (n_items × k); ``rows``/``cols`` index them (int64)."""
    residual = ratings - (users[rows] * items[cols]).sum(dim=1)
    loss = 0.5 * residual.square().sum() + 0.5 * regularization * (
        users.square().sum() + items.square().sum()
    )
    user_gradient = regularization * users - torch.zeros_like(users).index_add_(
        0, rows, residual[:, None] * items[cols]
    )
    item_gradient = regularization * items - torch.zeros_like(items).index_add_(
        0, cols, residual[:, None] * users[rows]
    )
    return float(loss), user_gradient, item_gradient
