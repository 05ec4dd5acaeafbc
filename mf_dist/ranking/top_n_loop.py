"""The compiled loops of :mod:`mf_dist.ranking.top_n` (numba, CPU, nogil).

Each row's running top-N is a min-heap of N packed int64 keys, the worst at
the root, with the item row of each entry beside it. A key packs (score, tie
key) so that one integer comparison orders entries by score and, among equal
scores, puts the lower tie key first: the high 32 bits are the float32 score's
bits made order-preserving as a signed integer, the low 32 bits
``0xFFFFFFFF − tie``. An empty slot is int64's minimum. ``merge_tile`` walks
one tile of scores (rows × some item columns) per row; −inf entries (seen
items) are never kept.

Module-level functions so that numba's disk cache serves every worker
process (see :mod:`mf_dist.solvers.row_cholesky_loop`).
"""

from __future__ import annotations

import numba
import numpy as np

# Entries compared at once (a vectorised test) before a row's entries are looked at one by one:
# past the first few hundred items almost every chunk is below the worst kept score.
CHUNK = 16
EMPTY = np.iinfo(np.int64).min
LOW_BITS = 0xFFFFFFFF


@numba.njit(nogil=True, cache=True, boundscheck=False)
def ordered_bits(value):  # noqa: ANN001, ANN201
    """The float32 ``value``'s bits as an int64 that orders like the floats (no NaN)."""
    bits = np.int64(np.float32(value).view(np.int32))
    return bits if bits >= 0 else bits ^ 0x7FFFFFFF


@numba.njit(nogil=True, cache=True, boundscheck=False)
def key_score(key):  # noqa: ANN001, ANN201
    """The score packed in ``key`` (−inf for an empty slot)."""
    if key == EMPTY:
        return np.float32(-np.inf)
    high = key >> 32
    bits = high if high >= 0 else high ^ 0x7FFFFFFF
    return np.int32(bits).view(np.float32)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _sift_down(keys, rows, start, size):  # noqa: ANN001, ANN202
    """Restore the min-heap ``keys[:size]`` below ``start``, moving a hole down instead of swapping."""
    parent = start
    key, row = keys[start], rows[start]
    while True:
        child = 2 * parent + 1
        if child >= size:
            break
        child_key = keys[child]
        if child + 1 < size and keys[child + 1] < child_key:
            child += 1
            child_key = keys[child]
        if child_key >= key:
            break
        keys[parent], rows[parent] = child_key, rows[child]
        parent = child
    keys[parent], rows[parent] = key, row


@numba.njit(nogil=True, cache=True, boundscheck=False)
def heapify_rows(keys, rows):  # noqa: ANN001, ANN201
    """Make each row of the running top-N a min-heap, in place."""
    n = keys.shape[1]
    for row in range(keys.shape[0]):
        for slot in range(n // 2 - 1, -1, -1):
            _sift_down(keys[row], rows[row], slot, n)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def merge_tile(scores, first, seen_start, seen_columns, seen_cursor, tie, item_rows, keys, rows):  # noqa: ANN001, ANN201
    """Merge ``scores`` (rows × w: item columns ``first .. first + w``) into the rows' heaps.

    Row i's seen columns, ascending, are ``seen_columns[seen_start[i]:seen_start[i + 1]]``;
    ``seen_cursor[i]`` is the first not yet passed (tiles come in ascending column order)
    and is advanced. Seen entries of ``scores`` are overwritten with −inf.
    """
    negative_infinity = np.float32(-np.inf)
    width = scores.shape[1]
    last = first + width
    n = keys.shape[1]
    for row in range(scores.shape[0]):
        values = scores[row]
        cursor = seen_cursor[row]
        end = seen_start[row + 1]
        while cursor < end and seen_columns[cursor] < last:
            values[seen_columns[cursor] - first] = negative_infinity
            cursor += 1
        seen_cursor[row] = cursor
        heap_keys, heap_rows = keys[row], rows[row]
        worst = key_score(heap_keys[0])
        for start in range(0, width, CHUNK):
            stop = min(start + CHUNK, width)
            hit = False
            for column in range(start, stop):
                hit |= values[column] >= worst
            if not hit:
                continue
            for column in range(start, stop):
                value = values[column]
                if value < worst or value == negative_infinity:
                    continue
                key = (ordered_bits(value) << 32) | (LOW_BITS - tie[first + column])
                if key > heap_keys[0]:
                    heap_keys[0], heap_rows[0] = key, item_rows[first + column]
                    _sift_down(heap_keys, heap_rows, 0, n)
                    worst = key_score(heap_keys[0])
