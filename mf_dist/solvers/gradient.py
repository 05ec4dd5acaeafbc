"""Gradient solvers on one block: full-batch Adam and mini-batch sparse Adam.

Optimiser state travels with the factor block it belongs to (a plain dict of
tensors), so a block can be updated on any worker and resumed anywhere. The
update rules are torch's own (``torch.optim.Adam``, ``torch.optim.SparseAdam``,
Kingma & Ba 2015); this module only carries their state between tasks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812 (the PyTorch convention)
from torch import Tensor

from mf_dist.blocks import OptimizerState, RowBlock

# Sparse Adagrad builds its update with invariant checks off, as we want them, and warns
# about that on every first step, in every worker.
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


def _load_state(optimizer: torch.optim.Optimizer, state: OptimizerState | None) -> None:
    if state:
        snapshot = optimizer.state_dict()
        snapshot["state"] = state
        optimizer.load_state_dict(snapshot)


def _state_on_cpu(optimizer: torch.optim.Optimizer) -> OptimizerState:
    return {
        index: {
            name: value.detach().cpu() if isinstance(value, Tensor) else value
            for name, value in entry.items()
        }
        for index, entry in optimizer.state_dict()["state"].items()
    }


def make_optimizer(
    name: str, params: list[Tensor], learning_rate: float, sparse: bool
) -> torch.optim.Optimizer:
    """Adam (SparseAdam for sparse gradients, Kingma & Ba 2015) or Adagrad (Duchi et al. 2011)."""
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=learning_rate)
    if name == "adam":
        return (
            torch.optim.SparseAdam(params, lr=learning_rate)
            if sparse
            else torch.optim.Adam(params, lr=learning_rate)
        )
    raise ValueError(f"unknown optimizer {name!r}; choose adam or adagrad")


def optimizer_step(
    param: Tensor,
    grad: Tensor,
    state: OptimizerState | None,
    learning_rate: float,
    optimizer_name: str = "adam",
) -> tuple[Tensor, OptimizerState]:
    """One optimiser step on a dense block: returns the new block and its optimiser state."""
    updated = param.detach().clone().requires_grad_(True)
    optimizer = make_optimizer(optimizer_name, [updated], learning_rate, sparse=False)
    _load_state(optimizer, state)
    updated.grad = grad.to(updated.dtype)
    optimizer.step()
    return updated.detach(), _state_on_cpu(optimizer)


BatchObjective = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def sparse_adam_pass(
    rows: RowBlock,
    cols: RowBlock,
    row_index: Tensor,
    col_index: Tensor,
    values: Tensor,
    objective: BatchObjective,
    *,
    learning_rate: float,
    optimizer_name: str = "adam",
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[RowBlock, RowBlock, float, float]:
    """One pass of mini-batch SparseAdam (or sparse Adagrad) over the observed entries of one block.

    ``row_index``/``col_index`` (n, int64) index the rows of ``rows``/``cols``
    for each observed value (n, float32). ``objective(row_vecs, col_vecs,
    row_bias, col_bias, values)`` returns the summed objective and the summed
    squared error of a batch; the step minimises their batch mean. Only the
    rows a batch touches are updated (lazy Adam), as in embedding training.

    Returns the updated blocks (on the CPU), and the objective and squared
    error summed over the pass, each measured on a batch just before its step.
    """
    row_vectors = rows.vectors.to(device).clone().requires_grad_(True)
    row_bias = rows.bias.to(device).unsqueeze(1).clone().requires_grad_(True)
    col_vectors = cols.vectors.to(device).clone().requires_grad_(True)
    col_bias = cols.bias.to(device).unsqueeze(1).clone().requires_grad_(True)
    row_optimizer = make_optimizer(optimizer_name, [row_vectors, row_bias], learning_rate, sparse=True)
    col_optimizer = make_optimizer(optimizer_name, [col_vectors, col_bias], learning_rate, sparse=True)
    _load_state(row_optimizer, rows.state)
    _load_state(col_optimizer, cols.state)

    row_index, col_index, values = row_index.to(device), col_index.to(device), values.to(device)
    order = torch.randperm(len(values), generator=generator).to(device)
    total_objective = torch.zeros((), dtype=torch.float64, device=device)
    total_squared_error = torch.zeros((), dtype=torch.float64, device=device)
    for batch in torch.split(order, batch_size):
        r, c = row_index[batch], col_index[batch]
        summed, squared_error = objective(
            F.embedding(r, row_vectors, sparse=True),
            F.embedding(c, col_vectors, sparse=True),
            F.embedding(r, row_bias, sparse=True).squeeze(1),
            F.embedding(c, col_bias, sparse=True).squeeze(1),
            values[batch],
        )
        row_optimizer.zero_grad(set_to_none=True)
        col_optimizer.zero_grad(set_to_none=True)
        (summed / len(batch)).backward()
        row_optimizer.step()
        col_optimizer.step()
        total_objective += summed.detach()
        total_squared_error += squared_error.detach()

    updated_rows = RowBlock(
        row_vectors.detach().cpu(), row_bias.detach().squeeze(1).cpu(), _state_on_cpu(row_optimizer)
    )
    updated_cols = RowBlock(
        col_vectors.detach().cpu(), col_bias.detach().squeeze(1).cpu(), _state_on_cpu(col_optimizer)
    )
    return updated_rows, updated_cols, float(total_objective), float(total_squared_error)
