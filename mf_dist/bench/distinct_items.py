"""Each user's distinct items, drawn from the popularity law without replacement (numba, CPU).

``distinct_items(counts, popularity, seed)`` gives user u exactly ``counts[u]``
distinct items: the first ``counts[u]`` distinct values of an endless sequence
of independent draws from ``popularity`` (successive sampling: each new item
is drawn in proportion to the popularity among the items the user does not
have yet). That is the law of the generator's former top-up loop, which drew
the missing ratings of every user again and deduplicated all keys with
``np.unique`` until none was missing; here a repeated draw is rejected on the
spot, user by user, in one pass.

Every user draws from its own stream (splitmix64 seeded by ``seed`` and the
user), so a user's items do not depend on the users before it. Items are
drawn by the inverse of the cumulative popularity (a binary search over the
items in decreasing popularity); a stamp array remembers which items the
current user holds.
"""

from __future__ import annotations

import numba
import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
MIX_2 = np.uint64(0x94D049BB133111EB)
SHIFT_30, SHIFT_27, SHIFT_31, SHIFT_11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
UNIT = 1.0 / 9007199254740992.0  # 2⁻⁵³: a 53-bit integer times this is a float64 in [0, 1)


@numba.njit(nogil=True, cache=True)
def splitmix64(state):  # noqa: ANN001, ANN201
    """(next state, 64 random bits): Steele, Lea & Flood's SplitMix64 step."""
    state = state + GOLDEN
    z = state
    z = (z ^ (z >> SHIFT_30)) * MIX_1
    z = (z ^ (z >> SHIFT_27)) * MIX_2
    return state, z ^ (z >> SHIFT_31)


@numba.njit(nogil=True, cache=True)
def sample_rows(counts, offsets, cumulative, ranked_items, seed, out):  # noqa: ANN001, ANN201
    """Fill ``out[offsets[u]:offsets[u] + counts[u]]`` with user u's distinct items, for every user.

    ``cumulative`` is the running sum of the popularity in decreasing order
    and ``ranked_items[r]`` the item of rank r. Counts above the number of
    items must have been capped by the caller.
    """
    n_items = len(cumulative)
    total = cumulative[n_items - 1]
    holder = np.full(n_items, -1, dtype=np.int64)
    for user in range(len(counts)):
        state, _ = splitmix64(seed ^ (np.uint64(user) * MIX_2))
        at = offsets[user]
        stop = at + counts[user]
        while at < stop:
            state, bits = splitmix64(state)
            u = (bits >> SHIFT_11) * UNIT * total
            rank = np.searchsorted(cumulative, u, side="right")
            if rank >= n_items:
                rank = n_items - 1
            if holder[rank] != user:
                holder[rank] = user
                out[at] = ranked_items[rank]
                at += 1
    return out


def distinct_items(counts: np.ndarray, popularity: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(user, item) int64 arrays: ``counts[u]`` distinct items for each user u, grouped by user.

    ``popularity`` (one positive weight per item) need not sum to 1. Within a
    user, items come in the order they were drawn.
    """
    counts = np.minimum(np.asarray(counts, dtype=np.int64), len(popularity))
    ranked_items = np.argsort(-np.asarray(popularity, dtype=np.float64), kind="stable").astype(np.int64)
    cumulative = np.cumsum(np.asarray(popularity, dtype=np.float64)[ranked_items])
    offsets = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=offsets[1:])
    items = np.empty(int(counts.sum()), dtype=np.int64)
    sample_rows(counts, offsets, cumulative, ranked_items, np.uint64(seed % 2**64), items)
    users = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    return users, items
