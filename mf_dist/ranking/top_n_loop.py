"""The compiled loops of :mod:`mf_dist.ranking.top_n` (numba, CPU, nogil).

Each row keeps up to 2N entries: packed int64 keys with the item row of each
beside it. A key packs (score, tie key) so that one integer comparison orders
entries by score and, among equal scores, puts the lower tie key first: the
high 32 bits are the float32 score's bits made order-preserving as a signed
integer, the low 32 bits ``0xFFFFFFFF − tie``. Keys are distinct; an empty
slot is int64's minimum.

``merge_tile`` appends every entry above the row's threshold, and when the
row holds 2N it keeps the N largest by quickselect (:func:`select_largest`) and
raises the threshold to the smallest of them: no entry below it can be among
the row's N best. That costs a few comparisons per kept entry, where a heap of
N paid a sift (measured about 3× slower on random scores, where about
N·ln(items/N) entries enter). −inf entries (seen items) are never kept.

Module-level functions so that numba's disk cache serves every worker
process (see :mod:`mf_dist.solvers.row_cholesky_loop`).
"""

from __future__ import annotations

import numba
import numpy as np

# Entries compared at once (a vectorised test) before a row's entries are looked at one by one:
# past the first few hundred items almost every chunk is below the threshold.
CHUNK = 16
# A row with no threshold yet (its first tile) is seeded from the maxima of groups of its entries:
# about this many groups per kept entry (see :func:`seed_threshold`).
SEED_GROUPS_PER_ENTRY = 4
# Halvings of the interval the seed is searched in: 2^-12 of the maxima's spread.
SEED_STEPS = 12
EMPTY = np.iinfo(np.int64).min
LOW_BITS = 0xFFFFFFFF


@numba.njit(nogil=True, cache=True, boundscheck=False)
def ordered_bits(value):  # noqa: ANN001, ANN201
    """The float32 ``value``'s bits as an int64 that orders like the floats (no NaN).

    −0.0 becomes +0.0 first (adding +0.0 does that): the two compare equal, so they must tie by item.
    """
    bits = np.int64(np.float32(value + np.float32(0.0)).view(np.int32))
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
def select_largest(keys, rows, count, n):  # noqa: ANN001, ANN201
    """Reorder ``keys[:count]`` (and ``rows`` with them) so that ``keys[:n]`` are the n largest.

    Quickselect with a median-of-three pivot; returns the smallest of the n (the new threshold).
    """
    low, high = 0, count - 1
    target = n - 1
    while low < high:
        middle = (low + high) // 2
        a, b, c = keys[low], keys[middle], keys[high]
        pivot = max(min(a, b), min(max(a, b), c))
        i, j = low, high
        while i <= j:
            while keys[i] > pivot:
                i += 1
            while keys[j] < pivot:
                j -= 1
            if i <= j:
                keys[i], keys[j] = keys[j], keys[i]
                rows[i], rows[j] = rows[j], rows[i]
                i += 1
                j -= 1
        if target <= j:
            high = j
        elif target >= i:
            low = i
        else:
            break
    smallest = keys[0]
    for slot in range(1, n):
        smallest = min(smallest, keys[slot])
    return smallest


@numba.njit(nogil=True, cache=True, boundscheck=False)
def seed_threshold(values, n):  # noqa: ANN001, ANN201
    """A key below which no entry of ``values`` (one row of a tile, float32) can be among the row's n best.

    The row's entries are cut into groups of equal size (about
    :data:`SEED_GROUPS_PER_ENTRY` · n groups); each group's maximum is a
    distinct entry, so a value v with at least n maxima at or above it is at
    most the n-th largest entry of the row: every entry of the row's top n
    scores at least v. v is found by bisection between the smallest finite
    and the largest maximum (:data:`SEED_STEPS` halvings; each step keeps
    the invariant, so v is a bound however few steps run). The key returned,
    v's bits in the high half and zeros below, is smaller than the key of
    any entry scoring v (their low halves are ``0xFFFFFFFF − tie`` ≥ 1), so
    ties at v all pass. Returns EMPTY (no bound) when the row has fewer than
    n groups or fewer than n finite maxima (seen items are −inf). On random
    scores this lets about 1.2·n of a 2,048-wide tile's entries through,
    where a threshold raised only as entries arrive let in most of the tile.
    """
    width = values.shape[0]
    width_per_group = max(1, width // (SEED_GROUPS_PER_ENTRY * n))
    groups = width // width_per_group
    if groups < n:
        return EMPTY
    # Group g holds columns g, g + groups, g + 2·groups, …: the maxima are taken a row slice at a
    # time, which compiles to vector instructions (contiguous groups did not).
    maxima = values[:groups].copy()
    for step in range(1, width_per_group):
        part = values[step * groups : (step + 1) * groups]
        for group in range(groups):
            maxima[group] = max(maxima[group], part[group])
    # A value with at least n maxima at or above it, by bisection: a few vectorised counts, where a
    # quickselect of the maxima (branches on random data) cost three times as much.
    low, high, finite = np.float32(np.inf), np.float32(-np.inf), 0
    for group in range(groups):
        value = maxima[group]
        if value > np.float32(-np.inf):
            finite += 1
            low = min(low, value)
        high = max(high, value)
    if finite < n:
        return EMPTY
    for _ in range(SEED_STEPS):
        middle = np.float32(low + (high - low) * np.float32(0.5))
        above = 0
        for group in range(groups):
            above += maxima[group] >= middle
        if above >= n:
            low = middle
        else:
            high = middle
    return ordered_bits(low) << 32


@numba.njit(nogil=True, cache=True, boundscheck=False)
def merge_tile(  # noqa: ANN201
    scores,  # noqa: ANN001
    first,  # noqa: ANN001
    seen_start,  # noqa: ANN001
    seen_columns,  # noqa: ANN001
    seen_cursor,  # noqa: ANN001
    tie,  # noqa: ANN001
    item_rows,  # noqa: ANN001
    keys,  # noqa: ANN001
    rows,  # noqa: ANN001
    counts,  # noqa: ANN001
    thresholds,  # noqa: ANN001
):
    """Merge ``scores`` (rows × w: item columns ``first .. first + w``) into the rows' kept entries.

    ``keys`` and ``rows`` are (rows × 2N); row i holds ``counts[i]`` entries, all above
    ``thresholds[i]`` except empty ones. Row i's seen columns, ascending, are
    ``seen_columns[seen_start[i]:seen_start[i + 1]]``; ``seen_cursor[i]`` is the first not
    yet passed (tiles come in ascending column order) and is advanced. Seen entries of
    ``scores`` are overwritten with −inf.
    """
    negative_infinity = np.float32(-np.inf)
    width = scores.shape[1]
    last = first + width
    capacity = keys.shape[1]
    n = capacity // 2
    for row in range(scores.shape[0]):
        values = scores[row]
        cursor = seen_cursor[row]
        end = seen_start[row + 1]
        while cursor < end and seen_columns[cursor] < last:
            values[seen_columns[cursor] - first] = negative_infinity
            cursor += 1
        seen_cursor[row] = cursor
        row_keys, row_rows = keys[row], rows[row]
        count, threshold = counts[row], thresholds[row]
        seeded = threshold == EMPTY
        if seeded:
            threshold = seed_threshold(values, n)
        worst = key_score(threshold)
        for start in range(0, width, CHUNK):
            stop = min(start + CHUNK, width)
            if stop - start == CHUNK:
                # A fixed trip count and an integer "or": the test compiles to a few vector compares.
                hit = np.int32(0)
                for offset in range(CHUNK):
                    hit |= np.int32(values[start + offset] >= worst)
                if hit == 0:
                    continue
            for column in range(start, stop):
                value = values[column]
                if value < worst or value == negative_infinity:
                    continue
                key = (ordered_bits(value) << 32) | (LOW_BITS - tie[first + column])
                if key <= threshold:
                    continue
                row_keys[count], row_rows[count] = key, item_rows[first + column]
                count += 1
                if count == capacity:
                    threshold = select_largest(row_keys, row_rows, count, n)
                    count = n
                    worst = key_score(threshold)
        if seeded and count > n:
            # The seed is loose (about the 1.2·n-th entry): tighten it now, before the next tiles.
            threshold = select_largest(row_keys, row_rows, count, n)
            count = n
        counts[row], thresholds[row] = count, threshold


@numba.njit(nogil=True, cache=True, boundscheck=False)
def finish_rows(keys, rows, counts):  # noqa: ANN001, ANN201
    """Leave each row's N largest kept entries in ``keys[:, :N]`` (the rest of the N empty)."""
    n = keys.shape[1] // 2
    for row in range(keys.shape[0]):
        count = counts[row]
        if count > n:
            select_largest(keys[row], rows[row], count, n)
        for slot in range(min(count, n), n):
            keys[row, slot] = EMPTY
            rows[row, slot] = -1
