"""Row-wise conjugate gradient for weighted least squares on a sparse pattern (Takács et al. 2011).

Row r of a block solves its own k × k system without ever forming it:

    (B + Σ_{e ∈ r} w_e y_{c_e} y_{c_e}ᵀ) x_r = Σ_{e ∈ r} b_e y_{c_e},

B (k × k) symmetric, shared by all rows (YᵀY + λI for implicit feedback),
the entries e of row r given in CSR form (``crow``, ``cols``), ``gram_weights``
w and ``rhs_weights`` b per entry (c − 1 and c for Hu et al.), y the rows of
``col_vectors`` (m × k). ``steps`` CG iterations start from the current rows.
Rows without entries get x_r = 0, their exact solution (b_r = 0).

Two implementations of the same iteration:

- :func:`batched_rows`, torch on any device: each matvec is one SDDMM and one
  CSR × dense product over the whole block, so it streams every y once per
  matvec (``steps`` + 1 times in all).
- :func:`fused_rows`, a compiled per-row loop on the CPU (numba; the
  algorithm of the Cython loop of the ``implicit`` library): a row's whole CG
  runs at once, and its y's, read in random order from the table in the
  first pass, are copied into one contiguous buffer that the later passes
  stream. Measured on one core at ML-20M's shape, k = 64: a block of items
  (746 K likes, y = the 138 K users' factors) 128 ms against 405 ms batched
  and 293 ms for ``implicit``'s loop; a block of users 26 ms against 29 and 44.

:func:`cg_rows` picks the fused loop for CPU tensors and the batched one
elsewhere; the choice is made here and nowhere else. Both also return the
scores x_rᵀ y_{c_e} at the solution, which loss terms need, so that callers do
not stream the y's once more.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

from mf_dist.solvers import normal_equations


def cg_rows(
    crow: Tensor,
    cols: Tensor,
    gram_weights: Tensor,
    rhs_weights: Tensor,
    start: Tensor,
    col_vectors: Tensor,
    base: Tensor,
    steps: int,
) -> tuple[Tensor, Tensor]:
    """``steps`` CG iterations per row from ``start`` (n × k); returns (solution (n × k), scores (e,)).

    ``crow`` (n + 1,) int64 and ``cols`` (e,) int64 are the CSR pattern (columns
    index ``col_vectors`` (m × k)); ``gram_weights`` and ``rhs_weights`` (e,);
    ``base`` (k × k) symmetric with every A_r positive definite. Everything in
    ``col_vectors``' dtype and on its device; the results too.
    """
    solve = fused_rows if col_vectors.device.type == "cpu" else batched_rows
    return solve(crow, cols, gram_weights, rhs_weights, start, col_vectors, base, steps)


def batched_rows(
    crow: Tensor,
    cols: Tensor,
    gram_weights: Tensor,
    rhs_weights: Tensor,
    start: Tensor,
    col_vectors: Tensor,
    base: Tensor,
    steps: int,
) -> tuple[Tensor, Tensor]:
    """:func:`cg_rows` as whole-block torch products (SDDMM, CSR SpMM, GEMM): any device."""
    n_rows, n_cols = len(start), len(col_vectors)
    col_vectors = col_vectors.contiguous()
    pattern = normal_equations.with_values(crow, cols, torch.ones_like(gram_weights), n_rows, n_cols)
    # Buffers reused by every matvec: large temporaries allocated and freed on
    # every step cost page faults on Dask workers (see mf_dist.runtime.cluster).
    sampled = pattern.clone()
    weighted_values = torch.empty_like(gram_weights)
    weighted = normal_equations.with_values(crow, cols, weighted_values, n_rows, n_cols)
    applied = torch.empty_like(start)

    def matvec(x: Tensor) -> Tensor:
        # B x_r + Σ_e w_e (y_eᵀ x_r) y_e; the same buffer every call (CG uses it up first).
        torch.sparse.sampled_addmm(pattern, x, col_vectors.T, beta=0.0, out=sampled)
        torch.mul(sampled.values(), gram_weights, out=weighted_values)
        torch.mm(weighted, col_vectors, out=applied)
        return applied.addmm_(x, base)

    rhs = normal_equations.with_values(crow, cols, rhs_weights, n_rows, n_cols) @ col_vectors
    solution = normal_equations.conjugate_gradient(matvec, rhs, start, steps)
    solution[crow[1:] == crow[:-1]] = 0
    scores = normal_equations.sampled_row_dots(pattern, solution, col_vectors)
    return solution, scores


def fused_rows(
    crow: Tensor,
    cols: Tensor,
    gram_weights: Tensor,
    rhs_weights: Tensor,
    start: Tensor,
    col_vectors: Tensor,
    base: Tensor,
    steps: int,
) -> tuple[Tensor, Tensor]:
    """:func:`cg_rows` as one compiled loop over rows: CPU tensors only; releases the GIL.

    Scratch: a (longest row × k) buffer for the gathered y's of a row and one score per entry.
    """
    solution = start.detach().clone().contiguous()
    scores = torch.empty_like(gram_weights)
    longest = int((crow[1:] - crow[:-1]).max()) if len(crow) > 1 else 0
    gathered = torch.empty(longest, col_vectors.shape[1], dtype=col_vectors.dtype)
    along = torch.empty(longest, dtype=col_vectors.dtype)
    _row_cg_kernel()(
        crow.numpy(),
        cols.numpy(),
        gram_weights.contiguous().numpy(),
        rhs_weights.contiguous().numpy(),
        col_vectors.detach().contiguous().numpy(),
        base.detach().contiguous().numpy(),
        steps,
        solution.numpy(),
        scores.numpy(),
        gathered.numpy(),
        along.numpy(),
    )
    return solution, scores


def warm_up() -> None:
    """Compile the fused loop for float32, the training dtype, or load it from numba's disk cache."""
    one = torch.ones(1, 1)
    fused_rows(torch.tensor([0, 1]), torch.tensor([0]), one[0], one[0], one, one, one, steps=1)


@cache
def _row_cg_kernel() -> Callable[..., None]:
    """The compiled loop (:mod:`mf_dist.solvers.row_cg_loop`), imported on first use.

    numba loads only where a CPU solve runs; its disk cache spares a new
    worker process the compilation (3–4 s).
    """
    from mf_dist.solvers.row_cg_loop import row_cg

    return row_cg
