"""The compiled running top-N merge against a full sort by (score descending, tie key ascending)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mf_dist.ranking import top_n
from mf_dist.ranking.top_n import merge_scores

NO_ITEM = np.iinfo(np.int64).max


@pytest.mark.parametrize(("tile_users", "tile_items"), [(7, 33), (512, 2048)])
def test_merge_equals_a_full_sort_across_item_groups(monkeypatch, tile_users, tile_items):
    """Tied scores (small integers), seen items, two item groups merged in turn, several tiles."""
    monkeypatch.setattr(top_n, "TILE_USERS", tile_users)
    monkeypatch.setattr(top_n, "TILE_ITEMS", tile_items)
    rng = np.random.default_rng(1)
    users, items, n, rank = 50, 300, 20, 3
    u = torch.from_numpy(rng.integers(-2, 3, (users, rank)).astype(np.float32))
    v = torch.from_numpy(rng.integers(-2, 3, (items, rank)).astype(np.float32))
    user_terms = torch.from_numpy(rng.integers(0, 2, users).astype(np.float32))
    item_terms = torch.from_numpy(rng.integers(0, 2, items).astype(np.float32))
    scores = (u @ v.T + user_terms[:, None] + item_terms[None, :]).numpy()
    tie = rng.permutation(items).astype(np.int64)
    recorded = np.arange(items, dtype=np.int64) + 1000
    # One user sees every item: no row for them.
    seen = [np.sort(rng.choice(items, rng.integers(0, 40), replace=False)) for _ in range(users - 1)]
    seen.append(np.arange(items))
    best = (
        np.full((users, n), -np.inf, np.float32),
        np.full((users, n), -1, np.int64),
        np.full((users, n), NO_ITEM, np.int64),
    )
    for low, high in ((0, 150), (150, items)):
        inside = [columns[(columns >= low) & (columns < high)] - low for columns in seen]
        start = np.cumsum([0] + [len(columns) for columns in inside]).astype(np.int64)
        merge_scores(
            u,
            user_terms,
            v[low:high],
            item_terms[low:high],
            tie[low:high],
            recorded[low:high],
            start,
            np.concatenate(inside).astype(np.int64),
            *best,
        )
    for user in range(users):
        unseen = np.setdiff1d(np.arange(items), seen[user])
        order = unseen[np.lexsort((tie[unseen], -scores[user, unseen]))][:n]
        kept = len(order)
        np.testing.assert_array_equal(best[1][user, :kept], recorded[order])
        np.testing.assert_array_equal(best[0][user, :kept], scores[user, order])
        np.testing.assert_array_equal(best[2][user, :kept], tie[order])
        assert (best[1][user, kept:] == -1).all() and np.isneginf(best[0][user, kept:]).all()
    assert (best[1][-1] == -1).all()


def test_select_largest_keeps_the_n_largest_keys_with_their_rows():
    """Quickselect against a sort, on distinct keys, many equal keys and empty slots."""
    from mf_dist.ranking.top_n_loop import select_largest

    rng = np.random.default_rng(0)
    for trial in range(3000):
        count = int(rng.integers(1, 60))
        n = int(rng.integers(1, count + 1))
        if trial % 2:
            keys = rng.integers(-5, 5, count).astype(np.int64)
        else:
            keys = rng.permutation(count).astype(np.int64)
        if trial % 3 == 0:
            keys[rng.random(count) < 0.3] = NO_ITEM * -1 - 1
        rows = np.arange(count, dtype=np.int64)
        before = keys.copy()
        smallest = select_largest(keys, rows, count, n)
        assert sorted(keys[:n].tolist()) == sorted(before.tolist())[-n:]
        assert smallest == keys[:n].min()
        np.testing.assert_array_equal(before[rows], keys)


@pytest.mark.parametrize("width", [20, 99, 400, 2048])
def test_seed_threshold_lets_every_one_of_the_n_best_through(width):
    """The seeded key is below the key of each of the row's n best entries (ties at the n-th included),
    and no seed where the row has fewer than n finite entries."""
    from mf_dist.ranking.top_n import pack_keys
    from mf_dist.ranking.top_n_loop import EMPTY, seed_threshold

    rng = np.random.default_rng(width)
    n = 20
    for trial in range(200):
        values = rng.standard_normal(width).astype(np.float32)
        if trial % 2:
            values = np.round(values).astype(np.float32)
        values[rng.random(width) < 0.3 * (trial % 3)] = -np.inf
        tie = rng.permutation(width).astype(np.int64)
        seed = seed_threshold(values, n)
        finite = np.isfinite(values)
        if finite.sum() < n:
            assert seed == EMPTY
            continue
        keys = pack_keys(values[None, :], tie[None, :])[0]
        best = np.sort(keys[finite])[::-1][:n]
        assert (best > seed).all()
        if seed != EMPTY:
            # Not vacuous: at most the n best and the entries tied with the n-th pass at width ≥ 4n.
            assert (keys > seed).sum() >= n
