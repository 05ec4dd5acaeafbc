"""The compiled loops of :mod:`mf_dist.counting.pair_counts` (numba, CPU, nogil).

Imported only where a tile is counted (numba loads with it); the functions
are module-level so that numba's disk cache serves every worker process
(a closure's cache key holds its cells pickled, which differ per process).
In the loops, (lptr, lidx) is left's CSR (rows → users) and (rptr, ridx)
right's (users → columns).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True, boundscheck=False)
def upper_start(rptr, ridx, user, row, cursors):  # noqa: ANN001, ANN201
    # Where the user's columns j ≥ row start. Rows come in increasing order
    # and each is in the lists of its own users (left = rightᵀ), so after
    # one binary search the position only moves on by one per visit.
    first = cursors[user]
    if first < 0:
        first, high = rptr[user], rptr[user + 1]
        while first < high:
            middle = (first + high) >> 1
            if ridx[middle] < row:
                first = middle + 1
            else:
                high = middle
    cursors[user] = first + 1
    return first


@numba.njit(nogil=True, cache=True, boundscheck=False)
def row_work_kernel(lptr, lidx, rptr, ridx, upper, cursors, work):  # noqa: ANN001, ANN201
    for i in range(len(lptr) - 1):
        total = 0
        for e in range(lptr[i], lptr[i + 1]):
            user = lidx[e]
            first = upper_start(rptr, ridx, user, i, cursors) if upper else rptr[user]
            total += rptr[user + 1] - first
        work[i] = total


@numba.njit(nogil=True, cache=True, boundscheck=False)
def dense_rows_kernel(lptr, lidx, rptr, ridx, start, stop, upper, cursors, out):  # noqa: ANN001, ANN201
    for i in range(start, stop):
        row = out[i - start]
        for e in range(lptr[i], lptr[i + 1]):
            user = lidx[e]
            first = upper_start(rptr, ridx, user, i, cursors) if upper else rptr[user]
            for f in range(first, rptr[user + 1]):
                # An unsigned index spares numba's negative-index wraparound.
                row[numba.uint32(ridx[f])] += 1


@numba.njit(nogil=True, cache=True, boundscheck=False)
def mirror_upper_kernel(tile):  # noqa: ANN001, ANN201
    # In 64 × 64 squares, so that the column-wise writes stay in cache.
    n = tile.shape[0]
    for row_start in range(0, n, 64):
        for col_start in range(row_start, n, 64):
            for i in range(row_start, min(row_start + 64, n)):
                for j in range(max(col_start, i + 1), min(col_start + 64, n)):
                    tile[j, i] = tile[i, j]


@numba.njit(nogil=True, cache=True, boundscheck=False)
def summary_kernel(tile, diagonal):  # noqa: ANN001, ANN201
    # Also the largest count (diagonal included), by which the caller knows whether int64 sufficed.
    nonzeros, squares, largest = 0, 0, 0
    for i in range(tile.shape[0]):
        row = tile[i]
        for j in range(tile.shape[1]):
            count = np.int64(row[j])
            nonzeros += count != 0
            squares += count * count
            largest = max(largest, count)
        if diagonal and i < tile.shape[1]:
            count = np.int64(row[i])
            nonzeros -= count != 0
            squares -= count * count
    return nonzeros, squares, largest


@numba.njit(nogil=True, cache=True, boundscheck=False)
def entries_kernel(tile, diagonal, rows, cols, counts):  # noqa: ANN001, ANN201
    at = 0
    for i in range(tile.shape[0]):
        row = tile[i]
        for j in range(tile.shape[1]):
            if row[j] != 0 and not (diagonal and i == j):
                rows[at], cols[at], counts[at] = i, j, row[j]
                at += 1
