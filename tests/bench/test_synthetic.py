"""The synthetic ratings generator: its item draws follow the popularity law without replacement,
and its summary statistics match the former generator's (rounds of draws and ``np.unique``)."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from mf_dist.bench.distinct_items import distinct_items
from mf_dist.bench.synthetic import synthetic_ratings

LIKE = 4.0


def legacy_synthetic_ratings(
    n_ratings: int,
    *,
    n_users: int,
    n_items: int,
    latent_rank: int = 8,
    min_user_ratings: int = 20,
    popularity_exponent: float = 0.9,
    intercept: float = 3.6,
    seed: int = 0,
) -> pd.DataFrame:
    """The generator as it was before distinct_items (commit 258302d), verbatim but for the frame's order."""
    rng = np.random.default_rng(seed)
    min_user_ratings = min(min_user_ratings, n_ratings // n_users, n_items)
    popularity_rank = rng.permutation(n_items)
    popularity = 1.0 / (popularity_rank + 10.0) ** popularity_exponent
    popularity /= popularity.sum()
    extra = rng.lognormal(0.0, 1.2, n_users)
    extra *= (n_ratings - min_user_ratings * n_users) / extra.sum()
    counts = min_user_ratings + np.floor(extra).astype(np.int64)
    shortfall = n_ratings - int(counts.sum())
    counts += np.bincount(rng.integers(0, n_users, max(shortfall, 0)), minlength=n_users)
    counts = np.minimum(counts, max(1, n_items // 2))
    keys = np.empty(0, dtype=np.int64)
    need = counts
    for _ in range(200):
        if not need.any():
            break
        users = np.repeat(np.arange(n_users, dtype=np.int64), need)
        items = rng.choice(n_items, size=len(users), p=popularity)
        keys = np.unique(np.concatenate([keys, users * n_items + items]))
        need = counts - np.bincount(keys // n_items, minlength=n_users)
    user, item = keys // n_items, keys % n_items
    user_factors = rng.normal(0, 1 / np.sqrt(latent_rank), (n_users, latent_rank))
    item_factors = rng.normal(0, 1 / np.sqrt(latent_rank), (n_items, latent_rank))
    user_bias = rng.normal(0, 0.35, n_users)
    item_bias = rng.normal(0, 0.3, n_items) - 0.15 * np.log1p(popularity_rank / 100)
    score = (
        intercept
        + user_bias[user]
        + item_bias[item]
        + 1.2 * (user_factors[user] * item_factors[item]).sum(axis=1)
        + rng.normal(0, 0.5, len(user))
    )
    rating = np.clip(np.round(score * 2) / 2, 0.5, 5.0).astype(np.float32)
    return pd.DataFrame({"user_id": user, "item_id": item, "rating": rating})


def popularity_ranks(n_items: int, seed: int) -> np.ndarray:
    """Each item's popularity rank, as both generators draw it first from their seed."""
    return np.random.default_rng(seed).permutation(n_items)


def test_two_items_a_user_follow_successive_sampling_exactly():
    """P({i, j}) = p_i p_j (1/(1 − p_i) + 1/(1 − p_j)) for two items drawn without replacement."""
    p = np.array([0.4, 0.3, 0.2, 0.1])
    n_users = 200_000
    users, items = distinct_items(np.full(n_users, 2), p, seed=11)
    pairs = np.sort(items.reshape(n_users, 2), axis=1)
    seen = pd.Series(map(tuple, pairs)).value_counts()
    for i, j in itertools.combinations(range(4), 2):
        expected = p[i] * p[j] * (1 / (1 - p[i]) + 1 / (1 - p[j]))
        share = seen.get((i, j), 0) / n_users
        # Four standard errors of a share out of 200,000.
        assert abs(share - expected) < 4 * np.sqrt(expected * (1 - expected) / n_users), (i, j)
    np.testing.assert_array_equal(users, np.repeat(np.arange(n_users), 2))


def test_one_item_a_user_is_a_draw_from_the_popularity():
    p = np.array([5.0, 3.0, 1.0, 1.0])  # need not sum to 1
    n_users = 100_000
    _, items = distinct_items(np.ones(n_users, dtype=np.int64), p, seed=3)
    shares = np.bincount(items, minlength=4) / n_users
    np.testing.assert_allclose(shares, p / p.sum(), atol=4 * np.sqrt(0.25 / n_users))


def test_every_user_gets_its_count_of_distinct_items_the_same_for_a_seed():
    rng = np.random.default_rng(0)
    popularity = 1 / (rng.permutation(500) + 10.0) ** 0.9
    counts = rng.integers(0, 400, 300)
    counts[5] = 500  # every item: the last ones are found however rare
    users, items = distinct_items(counts, popularity, seed=1)
    frame = pd.DataFrame({"user": users, "item": items})
    assert not frame.duplicated().any()
    np.testing.assert_array_equal(np.bincount(users, minlength=300), counts)
    _, again_items = distinct_items(counts, popularity, seed=1)
    np.testing.assert_array_equal(again_items, items)
    _, other = distinct_items(counts, popularity, seed=2)
    assert not np.array_equal(other, items)
    # A user's items do not depend on the other users' counts.
    changed = counts.copy()
    changed[3] += 50
    _, moved = distinct_items(changed, popularity, seed=1)
    start = counts[:7].sum()
    np.testing.assert_array_equal(
        moved[start + 50 : start + 50 + counts[7]], items[start : start + counts[7]]
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_per_user_counts_are_the_former_generators(seed):
    shape = {"n_users": 600, "n_items": 3000, "seed": seed}
    new = synthetic_ratings(60_000, **shape)
    old = legacy_synthetic_ratings(60_000, **shape)
    assert len(new) == len(old)
    np.testing.assert_array_equal(
        new.groupby("user_id").size().sort_index().to_numpy(),
        old.groupby("user_id").size().sort_index().to_numpy(),
    )
    assert not new.duplicated(["user_id", "item_id"]).any()


def test_popularity_curve_is_the_former_generators():
    """Shares of ratings by popularity rank band: the same law, so equal within sampling noise."""
    n_items, seed = 3000, 4
    new = synthetic_ratings(120_000, n_users=1200, n_items=n_items, seed=seed)
    old = legacy_synthetic_ratings(120_000, n_users=1200, n_items=n_items, seed=seed)
    ranks = popularity_ranks(n_items, seed)
    bands = [0, 10, 30, 100, 300, 1000, n_items]
    for frame in (new, old):
        frame["band"] = np.searchsorted(bands, ranks[frame["item_id"].to_numpy()], side="right")
    new_shares = new["band"].value_counts(normalize=True).sort_index()
    old_shares = old["band"].value_counts(normalize=True).sort_index()
    # Bands of 10 items at the head hold a few % of 120,000 ratings: ±0.005 is several standard errors.
    np.testing.assert_allclose(new_shares.to_numpy(), old_shares.to_numpy(), atol=0.005)
    # The head is rated far more than the tail, as the law says.
    per_item = new_shares.to_numpy() / np.diff(bands)
    assert (np.diff(per_item) < 0).all()
    assert new["item_id"].nunique() == pytest.approx(old["item_id"].nunique(), rel=0.01)


def test_likes_share_is_the_former_generators():
    """Over eight seeds (one seed's share moves by a few points with its item biases)."""
    shape = {"n_users": 600, "n_items": 3000, "intercept": 3.86}
    new = [float((synthetic_ratings(60_000, seed=s, **shape)["rating"] >= LIKE).mean()) for s in range(8)]
    old = [
        float((legacy_synthetic_ratings(60_000, seed=s, **shape)["rating"] >= LIKE).mean()) for s in range(8)
    ]
    assert np.mean(new) == pytest.approx(np.mean(old), abs=0.02)
