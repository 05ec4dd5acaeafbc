"""Running top-N per user of user × item scores, seen items excluded, ties by a key (CPU, compiled).

The recommendations stage scores a block of users against a group of items
and keeps each user's N best items across groups. On the CPU
:func:`merge_scores` computes the scores tile by tile (users × items small
enough to stay in cache: at ML-20M's shape a whole block's scores are 440 MB,
and reading them back from memory cost more than the product) and merges each
tile into per-user candidate buffers in one pass (up to 2N packed keys, cut
back to N by quickselect when full; entries below a row's exact lower bound,
seeded from its first tile, are skipped by a vectorised compare per 16
entries), instead of a top-k and a sort per item block. It is
exact: the same entries, in the same order, as a full sort by (score
descending, tie key ascending).
"""

from __future__ import annotations

from functools import cache
from types import ModuleType

import numpy as np
import torch

EMPTY = np.iinfo(np.int64).min
LOW_BITS = 0xFFFFFFFF
NO_TIE = np.iinfo(np.int64).max
MAX_TIE = LOW_BITS - 1
"""Tie keys must be below this (they are packed in 32 bits): four billion items."""

# Users × items per tile: 512 × 2048 float32 scores are 4 MiB (measured fastest of 64 … 4096
# users × 1024 … all items at ML-20M's shape on the 2-core development machine).
TILE_USERS = 512
TILE_ITEMS = 2048


@cache
def _kernels() -> ModuleType:
    """The compiled loops (:mod:`mf_dist.ranking.top_n_loop`), imported on first use (numba with them)."""
    from mf_dist.ranking import top_n_loop

    return top_n_loop


def merge_scores(
    users: torch.Tensor,
    user_terms: torch.Tensor,
    items: torch.Tensor,
    item_terms: torch.Tensor,
    tie: np.ndarray,
    item_rows: np.ndarray,
    seen_start: np.ndarray,
    seen_columns: np.ndarray,
    best_scores: np.ndarray,
    best_rows: np.ndarray,
    best_tie: np.ndarray,
) -> None:
    """Merge ``users @ items.T + user_terms[:, None] + item_terms[None, :]`` into each user's top-N.

    ``users`` (r, k) and ``items`` (m, k) float32 on the CPU; ``user_terms``
    (r,) and ``item_terms`` (m,) float32 (biases, global mean; zeros without).
    ``tie`` (m,) int64 is each item's tie key (lower wins among equal scores),
    ``item_rows`` (m,) int64 what is recorded for it. User i's seen items are
    the columns ``seen_columns[seen_start[i]:seen_start[i + 1]]`` (int64,
    ascending per user; ``seen_start`` has r + 1 entries). ``best_scores``
    (r, N) float32, ``best_rows`` and ``best_tie`` (r, N) int64 hold the
    running top-N, best first (−inf, −1 and int64 max in empty slots), and are
    updated in place, best first. Seen items and −inf scores are never kept.
    Scores must not be NaN: give finite vectors (NaN entries are skipped).
    Tie keys must be at most :data:`MAX_TIE`.
    """
    kernels = _kernels()
    users_count, n = best_scores.shape
    # Room for N more per row; the first N hold the running top-N (empty slots: the smallest key).
    keys = np.full((users_count, 2 * n), EMPTY, np.int64)
    rows = np.full((users_count, 2 * n), -1, np.int64)
    keys[:, :n] = pack_keys(best_scores, best_tie)
    rows[:, :n] = best_rows
    counts = np.full(users_count, n, np.int64)
    # Below the smallest running key nothing can enter (EMPTY while a slot is empty).
    thresholds = keys[:, :n].min(axis=1)
    items_t = items.T
    # Models without biases pass zeros: adding them cost about a third of the tiled product.
    add_items = bool(item_terms.any())
    add_users = bool(user_terms.any())
    for first_user in range(0, users_count, TILE_USERS):
        last_user = min(first_user + TILE_USERS, users_count)
        block = slice(first_user, last_user)
        cursor = seen_start[first_user:last_user].copy()
        starts = seen_start[first_user : last_user + 1]
        for first_item in range(0, items.shape[0], TILE_ITEMS):
            last_item = min(first_item + TILE_ITEMS, items.shape[0])
            scores = users[block] @ items_t[:, first_item:last_item]
            if add_items:
                scores += item_terms[first_item:last_item][None, :]
            if add_users:
                scores += user_terms[block][:, None]
            kernels.merge_tile(
                scores.numpy(),
                first_item,
                starts,
                seen_columns,
                cursor,
                tie,
                item_rows,
                keys[block],
                rows[block],
                counts[block],
                thresholds[block],
            )
    kernels.finish_rows(keys, rows, counts)
    keys, rows = keys[:, :n], rows[:, :n]
    # Best first: descending keys.
    order = np.argsort(keys, axis=1)[:, ::-1]
    keys = np.take_along_axis(keys, order, axis=1)
    best_rows[:] = np.take_along_axis(rows, order, axis=1)
    best_scores[:], best_tie[:] = unpack_keys(keys)
    best_rows[keys == EMPTY] = -1


def pack_keys(scores: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """(r, N) int64 keys of (score, tie) entries (see :mod:`mf_dist.ranking.top_n_loop`); −inf: empty."""
    # + 0.0 turns −0.0 into +0.0 (equal scores, so ties by item), as the compiled loop does.
    bits = (scores.astype(np.float32) + np.float32(0.0)).view(np.int32).astype(np.int64)
    ordered = np.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    keys = (ordered << 32) | (LOW_BITS - np.where(np.isneginf(scores), LOW_BITS, tie))
    return np.where(np.isneginf(scores), EMPTY, keys)


def unpack_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores float32, tie int64) of packed keys; empty slots: −inf and int64 max."""
    high = keys >> 32
    bits = np.where(high >= 0, high, high ^ 0x7FFFFFFF).astype(np.int32)
    empty = keys == EMPTY
    scores = np.where(empty, -np.inf, bits.view(np.float32)).astype(np.float32)
    tie = np.where(empty, NO_TIE, LOW_BITS - (keys & LOW_BITS))
    return scores, tie


def warm_up() -> None:
    """Compile the loops for the stage's dtypes, or load them from numba's disk cache."""
    index = np.zeros(1, np.int64)
    merge_scores(
        torch.zeros(1, 1),
        torch.zeros(1),
        torch.zeros(1, 1),
        torch.zeros(1),
        index,
        index,
        np.zeros(2, np.int64),
        index[:0],
        np.full((1, 1), -np.inf, np.float32),
        np.full((1, 1), -1, np.int64),
        np.zeros((1, 1), np.int64),
    )
