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

import numpy as np
import torch
from torch import Tensor

from mf_dist.solvers import normal_equations
from mf_dist.solvers.row_prefetch import row_prefetcher


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
    # every step cost page faults on Dask workers (see mf_dist.cluster).
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


# Entries ahead of the current one whose y rows the first pass asks the cache for.
PREFETCH_DISTANCE = 16


@cache
def _row_cg_kernel() -> Callable[..., None]:
    """The compiled loop, built on first use (numba loads only where a CPU solve runs).

    ``cache=True`` keeps the machine code on disk, so a new worker process loads
    it instead of compiling again (about a second per dtype).

    Entries are taken four at a time: four independent dot products hide
    each other's reduction latency, and one sweep adds four scaled y's into
    the k-vector instead of loading and storing it four times. The first
    pass prefetches the y rows of the entries :data:`PREFETCH_DISTANCE` ahead
    (:mod:`mf_dist.solvers.row_prefetch`). Together, on one core at ML-20M's
    shape: items 86–128 ms → 29–54 ms per block, users 18 → 9 ms (k = 64).
    """
    import numba

    prefetch_rows = row_prefetcher()
    # reassoc lets LLVM vectorise the dot products; contract fuses multiply-adds.
    fast = {"reassoc", "contract"}

    @numba.njit(nogil=True, cache=True, fastmath=fast, boundscheck=False)
    def symmetric_matvec(base, v, scale, out):  # noqa: ANN001, ANN202
        # out = scale · base v; base is symmetric, so its rows serve as columns.
        k = len(v)
        out[:] = 0
        a = 0
        while a + 4 <= k:
            v0, v1, v2, v3 = scale * v[a], scale * v[a + 1], scale * v[a + 2], scale * v[a + 3]
            b0, b1, b2, b3 = base[a], base[a + 1], base[a + 2], base[a + 3]
            for b in range(k):
                out[b] += v0 * b0[b] + v1 * b1[b] + v2 * b2[b] + v3 * b3[b]
            a += 4
        for rest in range(a, k):
            va, ba = scale * v[rest], base[rest]
            for b in range(k):
                out[b] += va * ba[b]

    @numba.njit(nogil=True, cache=True, fastmath=fast, boundscheck=False)
    def first_pass(y, cols, first, last, x, weights, rhs_weights, scores, gathered, residual):  # noqa: ANN001, ANN202
        # Copies each entry's y into ``gathered``, scores it (y_eᵀx) and adds
        # (b_e − w_e y_eᵀx) y_e to ``residual``.
        k = len(x)
        e = first
        while e < last:
            prefetch_rows(y, cols, e + PREFETCH_DISTANCE, e + PREFETCH_DISTANCE + 4)
            if e + 4 <= last:
                y0, y1, y2, y3 = y[cols[e]], y[cols[e + 1]], y[cols[e + 2]], y[cols[e + 3]]
                g0, g1 = gathered[e - first], gathered[e - first + 1]
                g2, g3 = gathered[e - first + 2], gathered[e - first + 3]
                d0 = d1 = d2 = d3 = x.dtype.type(0)
                for a in range(k):
                    g0[a], g1[a], g2[a], g3[a] = y0[a], y1[a], y2[a], y3[a]
                    d0 += y0[a] * x[a]
                    d1 += y1[a] * x[a]
                    d2 += y2[a] * x[a]
                    d3 += y3[a] * x[a]
                scores[e], scores[e + 1], scores[e + 2], scores[e + 3] = d0, d1, d2, d3
                c0 = rhs_weights[e] - weights[e] * d0
                c1 = rhs_weights[e + 1] - weights[e + 1] * d1
                c2 = rhs_weights[e + 2] - weights[e + 2] * d2
                c3 = rhs_weights[e + 3] - weights[e + 3] * d3
                for a in range(k):
                    residual[a] += c0 * y0[a] + c1 * y1[a] + c2 * y2[a] + c3 * y3[a]
                e += 4
                continue
            ye, copy = y[cols[e]], gathered[e - first]
            dot = x.dtype.type(0)
            for a in range(k):
                copy[a] = ye[a]
                dot += ye[a] * x[a]
            scores[e] = dot
            coefficient = rhs_weights[e] - weights[e] * dot
            for a in range(k):
                residual[a] += coefficient * ye[a]
            e += 1

    @numba.njit(nogil=True, cache=True, fastmath=fast, boundscheck=False)
    def weighted_pass(gathered, count, weights, direction, applied, along):  # noqa: ANN001, ANN202
        # along_i = y_iᵀd and applied += Σ_i w_i along_i y_i over the row's ``count`` gathered y's.
        k = len(direction)
        i = 0
        while i + 4 <= count:
            y0, y1, y2, y3 = gathered[i], gathered[i + 1], gathered[i + 2], gathered[i + 3]
            d0 = d1 = d2 = d3 = direction.dtype.type(0)
            for a in range(k):
                d0 += y0[a] * direction[a]
                d1 += y1[a] * direction[a]
                d2 += y2[a] * direction[a]
                d3 += y3[a] * direction[a]
            along[i], along[i + 1], along[i + 2], along[i + 3] = d0, d1, d2, d3
            c0, c1 = weights[i] * d0, weights[i + 1] * d1
            c2, c3 = weights[i + 2] * d2, weights[i + 3] * d3
            for a in range(k):
                applied[a] += c0 * y0[a] + c1 * y1[a] + c2 * y2[a] + c3 * y3[a]
            i += 4
        for rest in range(i, count):
            ye = gathered[rest]
            dot = direction.dtype.type(0)
            for a in range(k):
                dot += ye[a] * direction[a]
            along[rest] = dot
            coefficient = weights[rest] * dot
            for a in range(k):
                applied[a] += coefficient * ye[a]

    @numba.njit(nogil=True, cache=True, fastmath=fast, boundscheck=False)
    def row_cg(crow, cols, gram_weights, rhs_weights, y, base, steps, x_all, scores, gathered, along):  # noqa: ANN001, ANN202
        k = y.shape[1]
        one = y.dtype.type(1)
        residual = np.empty(k, y.dtype)
        direction = np.empty(k, y.dtype)
        applied = np.empty(k, y.dtype)
        for row in range(len(crow) - 1):
            first, last = crow[row], crow[row + 1]
            x = x_all[row]
            if first == last:
                x[:] = 0
                continue
            # residual = b − A x, with A x = B x + Σ_e w_e (y_eᵀ x) y_e.
            symmetric_matvec(base, x, -one, residual)
            first_pass(y, cols, first, last, x, gram_weights, rhs_weights, scores, gathered, residual)
            squared = y.dtype.type(0)
            for a in range(k):
                direction[a] = residual[a]
                squared += residual[a] * residual[a]
            for _ in range(steps):
                if squared == 0.0:
                    break
                symmetric_matvec(base, direction, one, applied)
                weighted_pass(gathered, last - first, gram_weights[first:last], direction, applied, along)
                curvature = y.dtype.type(0)
                for a in range(k):
                    curvature += direction[a] * applied[a]
                if not curvature > 0.0:
                    break
                step = squared / curvature
                new_squared = y.dtype.type(0)
                for a in range(k):
                    x[a] += step * direction[a]
                    residual[a] -= step * applied[a]
                    new_squared += residual[a] * residual[a]
                # The scores follow x: y_eᵀ(x + step·d) = y_eᵀx + step·y_eᵀd, so no last pass reads the y's.
                for e in range(first, last):
                    scores[e] += step * along[e - first]
                ratio = new_squared / squared
                for a in range(k):
                    direction[a] = residual[a] + ratio * direction[a]
                squared = new_squared

    return row_cg
