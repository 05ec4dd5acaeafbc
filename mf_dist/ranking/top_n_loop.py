"""The compiled loops of :mod:`mf_dist.ranking.top_n` (numba, CPU, nogil).

Each row's running top-N is a min-heap of N (score, tie key, item row)
entries, the worst at the root: ``heapify_rows`` makes one of a list, then
``merge_tile`` walks one tile of scores (rows × some item columns) per row
and ``sort_rows`` leaves every row best first. An entry beats the worst when
its score is higher, or equal with a lower tie key, so equal scores keep the
lowest tie keys whatever order the items are visited in. −inf entries (seen
items, empty slots) are never kept.

Module-level functions so that numba's disk cache serves every worker
process (see :mod:`mf_dist.solvers.row_cholesky_loop`).
"""

from __future__ import annotations

import numba
import numpy as np

# Entries compared at once (a vectorised test) before a row's entries are looked at one by one:
# past the first few hundred items almost every chunk is below the worst kept score.
CHUNK = 16


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _worse(score_a, tie_a, score_b, tie_b):  # noqa: ANN001, ANN202
    """Whether entry a ranks after entry b: lower score, or the same score and a higher tie key."""
    return score_a < score_b or (score_a == score_b and tie_a > tie_b)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _sift_down(scores, ties, rows, start, size):  # noqa: ANN001, ANN202
    """Restore the min-heap ``[0, size)`` (worst entry at the root) below ``start``."""
    parent = start
    while True:
        child = 2 * parent + 1
        if child >= size:
            return
        if child + 1 < size and _worse(scores[child + 1], ties[child + 1], scores[child], ties[child]):
            child += 1
        if not _worse(scores[child], ties[child], scores[parent], ties[parent]):
            return
        scores[parent], scores[child] = scores[child], scores[parent]
        ties[parent], ties[child] = ties[child], ties[parent]
        rows[parent], rows[child] = rows[child], rows[parent]
        parent = child


@numba.njit(nogil=True, cache=True, boundscheck=False)
def heapify_rows(best_scores, best_rows, best_tie):  # noqa: ANN001, ANN201
    """Make each row of the running top-N a min-heap, in place."""
    n = best_scores.shape[1]
    for row in range(best_scores.shape[0]):
        for slot in range(n // 2 - 1, -1, -1):
            _sift_down(best_scores[row], best_tie[row], best_rows[row], slot, n)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def sort_rows(best_scores, best_rows, best_tie):  # noqa: ANN001, ANN201
    """Heap sort each row in place: the worst goes last, so the row ends best first."""
    n = best_scores.shape[1]
    for row in range(best_scores.shape[0]):
        scores, ties, rows = best_scores[row], best_tie[row], best_rows[row]
        for size in range(n - 1, 0, -1):
            scores[0], scores[size] = scores[size], scores[0]
            ties[0], ties[size] = ties[size], ties[0]
            rows[0], rows[size] = rows[size], rows[0]
            _sift_down(scores, ties, rows, 0, size)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def merge_tile(  # noqa: ANN201
    scores,  # noqa: ANN001
    first,  # noqa: ANN001
    seen_start,  # noqa: ANN001
    seen_columns,  # noqa: ANN001
    seen_cursor,  # noqa: ANN001
    tie,  # noqa: ANN001
    item_rows,  # noqa: ANN001
    best_scores,  # noqa: ANN001
    best_rows,  # noqa: ANN001
    best_tie,  # noqa: ANN001
):
    """Merge ``scores`` (rows × w: item columns ``first .. first + w``) into the rows' heaps.

    Row i's seen columns, ascending, are ``seen_columns[seen_start[i]:seen_start[i + 1]]``;
    ``seen_cursor[i]`` is the first not yet passed (tiles come in ascending column order)
    and is advanced. Seen entries of ``scores`` are overwritten with −inf.
    """
    negative_infinity = np.float32(-np.inf)
    width = scores.shape[1]
    last = first + width
    for row in range(scores.shape[0]):
        values = scores[row]
        cursor = seen_cursor[row]
        end = seen_start[row + 1]
        while cursor < end and seen_columns[cursor] < last:
            values[seen_columns[cursor] - first] = negative_infinity
            cursor += 1
        seen_cursor[row] = cursor
        heap_scores, heap_ties, heap_rows = best_scores[row], best_tie[row], best_rows[row]
        n = len(heap_scores)
        worst_score, worst_tie = heap_scores[0], heap_ties[0]
        for start in range(0, width, CHUNK):
            stop = min(start + CHUNK, width)
            hit = False
            for column in range(start, stop):
                hit |= values[column] >= worst_score
            if not hit:
                continue
            for column in range(start, stop):
                value = values[column]
                if value < worst_score or value == negative_infinity:
                    continue
                key = tie[first + column]
                if value > worst_score or key < worst_tie:
                    heap_scores[0], heap_ties[0], heap_rows[0] = value, key, item_rows[first + column]
                    _sift_down(heap_scores, heap_ties, heap_rows, 0, n)
                    worst_score, worst_tie = heap_scores[0], heap_ties[0]
