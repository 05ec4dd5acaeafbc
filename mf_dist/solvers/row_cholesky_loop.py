"""The compiled exact row loop of :func:`mf_dist.solvers.weighted_cholesky.fused_rows` (numba, CPU, nogil).

``row_cholesky(crow, cols, gram_weights, rhs_weights, ridge, features, base,
out, copies, scaled)`` solves every row's system of a CSR block into ``out``
(n × K) and returns -1, or the first row whose system stayed not positive
definite even with the ridge retry; ``copies`` and ``scaled`` (longest row ×
K) are scratch, ``gram_weights`` empty for all ones. See
:mod:`mf_dist.solvers.weighted_cholesky` for the system.

Imported only where a CPU solve runs (numba loads with it); the functions
are module-level so that numba's disk cache serves every worker process
(a closure's cache key holds its cells pickled, which differ per process).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from mf_dist.solvers import normal_equations

# reassoc lets LLVM vectorise the dot products; contract fuses multiply-adds.
FAST_MATH = {"reassoc", "contract"}


@numba.njit(nogil=True, cache=True, fastmath=FAST_MATH, boundscheck=False)
def factor_in_place(a):  # noqa: ANN001, ANN201
    """Row-oriented Cholesky: L (lower) overwrites ``a``; False if a pivot fails.

    The dot products run along rows i and j, contiguous, so they vectorise.
    """
    for i in range(a.shape[0]):
        row_i = a[i]
        for j in range(i + 1):
            row_j = a[j]
            total = row_i[j]
            for m in range(j):
                total -= row_i[m] * row_j[m]
            if i == j:
                if not total > 0.0:
                    return False
                row_i[i] = math.sqrt(total)
            else:
                row_i[j] = total / row_j[j]
    return True


@numba.njit(nogil=True, cache=True, fastmath=FAST_MATH, boundscheck=False)
def row_cholesky(crow, cols, gram_weights, rhs_weights, ridge, features, base, out, copies, scaled):  # noqa: ANN001, ANN201
    """Every row's exact solve into ``out``; -1, or the row that failed; see the module docstring."""
    width = features.shape[1]
    # No gram weights stand for all ones: the copies serve as both factors.
    unit = len(gram_weights) == 0
    rhs = np.empty(width, features.dtype)
    for row in range(len(crow) - 1):
        first, last = crow[row], crow[row + 1]
        count = last - first
        x = out[row]
        if count == 0:
            x[:] = 0
            continue
        for e in range(count):
            source = features[cols[first + e]]
            copy = copies[e]
            for a in range(width):
                copy[a] = source[a]
            if not unit:
                weighted, weight = scaled[e], gram_weights[first + e]
                for a in range(width):
                    weighted[a] = weight * source[a]
        rhs[:] = np.dot(copies[:count].T, rhs_weights[first:last])
        left = copies[:count] if unit else scaled[:count]
        factored = False
        for attempt in range(2):
            # The row's system is one GEMM of its gathered features (BLAS);
            # the rare retry forms it again rather than every row keeping a copy.
            system = np.dot(left.T, copies[:count]) + base
            for a in range(width):
                system[a, a] += ridge[row]
            if attempt == 1:
                scale = max(1.0, np.abs(np.diag(system)).mean())
                for a in range(width):
                    system[a, a] += normal_equations.SINGULAR_RIDGE * scale
            if factor_in_place(system):
                factored = True
                break
        if not factored:
            return row
        # L y = b, then Lᵀ x = y.
        for i in range(width):
            total = rhs[i]
            for m in range(i):
                total -= system[i, m] * x[m]
            x[i] = total / system[i, i]
        for i in range(width - 1, -1, -1):
            total = x[i]
            for m in range(i + 1, width):
                total -= system[m, i] * x[m]
            x[i] = total / system[i, i]
    return -1
