"""recall@k and NDCG@k of held-out likes against values worked out by hand and an independent ranking.

The rules (mf_dist/stages/evaluation.py): a user is scored when it has a
held-out like (rating ≥ the like threshold); its relevant items are its
held-out likes; the items it liked in training are never recommended (items
it rated below the threshold stay candidates); recall@k = hits / min(k,
relevant); NDCG@k = Σ_hits 1/log2(position + 1) over the ideal Σ_{1..min(k,
relevant)} 1/log2(position + 1); both averaged over the scored users. A model
without a users table scores a user by the sum of the vectors of the items it
liked in training; ``nmf`` of X ranks ``contexts`` by that sum of ``items``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mf_dist.stages.evaluation import holdout_metrics
from mf_dist.storage.factor_files import EpochRecord, FactorTable, TrainResult, write_factor_block
from mf_dist.storage.ingested import IngestResult
from mf_dist.storage.schema import RATINGS_SCHEMA

THRESHOLD = 3.0
LIKE, DISLIKE = 5.0, 1.0


def write_tables(directory: Path, vectors: dict[str, np.ndarray], block_size: int) -> list[FactorTable]:
    tables = []
    for name, values in vectors.items():
        table = FactorTable(
            name=name,
            directory=str(directory / name),
            n_rows=len(values),
            block_size=block_size,
            rank=values.shape[1],
            has_bias=False,
        )
        for block, start, stop in table.grid:
            write_factor_block(table, block, values[start:stop].astype(np.float32), None)
        tables.append(table)
    return tables


def evaluate(client, tmp_path, model, vectors, train, held, *, n_users, block_size, k):
    """holdout_metrics on a work directory written by hand: ``train``/``held`` are (user, item, rating)."""
    ingest_dir = tmp_path / "ingest"
    n_items = len(vectors["items"])
    ingest = IngestResult(
        directory=str(ingest_dir),
        files=[],
        fingerprint="hand-made",
        n_users=n_users,
        n_items=n_items,
        n_ratings=len(train),
        n_likes=sum(rating >= THRESHOLD for _, _, rating in train),
        block_size=block_size,
        n_held_out=len(held),
        holdout=0.2,
        implicit=False,
        like_threshold=THRESHOLD,
        global_mean=3.0,
        duplicates_policy="error",
        duplicates_resolved=0,
        user_column="user_id",
        item_column="item_id",
        user_id_type="int64",
        item_id_type="int64",
    )
    for entries, path_of in ((train, ingest.ratings_path), (held, ingest.holdout_path)):
        for block, start, stop in ingest.user_grid:
            rows = sorted(entry for entry in entries if start <= entry[0] < stop)
            columns = list(zip(*rows, strict=True)) if rows else [[], [], []]
            Path(path_of(block)).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(
                pa.table(
                    {
                        "user": pa.array(columns[0], pa.int32()),
                        "item": pa.array(columns[1], pa.int32()),
                        "rating": pa.array(columns[2], pa.float32()),
                    },
                    schema=RATINGS_SCHEMA,
                ),
                path_of(block),
            )
    trained = TrainResult(
        model=model,
        rank=next(iter(vectors.values())).shape[1],
        epochs=1,
        learning_rate=0.1,
        history=[EpochRecord(epoch=1, loss=1.0, seconds=0.1)],
        tables=write_tables(tmp_path / "factors", vectors, block_size),
        device="cpu",
    )
    return holdout_metrics(client, ingest, trained, k=k)


def test_a_hand_made_case(client, tmp_path):
    """Four users over two user blocks, eight items, k = 3, every figure worked out by hand.

    Item i's vector is (10 − i, c_i): user 0 (1, 0) ranks the items 0, 1, 2, ...;
    user 1 (−1, 0) ranks them 7, 6, 5, ...; user 2 (0, 1) ranks them by c:
    3, 5, 7, 6, 1, 4, 2, 0.
    """
    c = [0.5, 3.0, 1.0, 7.0, 2.0, 6.0, 4.0, 5.0]
    items = np.array([[10.0 - i, c[i]] for i in range(8)])
    users = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    train = [
        (0, 0, LIKE),
        (0, 1, LIKE),
        (0, 2, DISLIKE),
        (1, 7, LIKE),
        (2, 5, LIKE),
        (3, 1, LIKE),
    ]
    held = [
        (0, 4, LIKE),
        (0, 7, LIKE),
        (0, 3, DISLIKE),
        (1, 6, LIKE),
        (1, 5, LIKE),
        (1, 4, LIKE),
        (1, 3, LIKE),
        (2, 1, LIKE),
        (3, 0, DISLIKE),  # no held-out like: user 3 is not scored
    ]
    metrics = evaluate(
        client,
        tmp_path,
        "implicit",
        {"users": users, "items": items},
        train,
        held,
        n_users=4,
        block_size=2,
        k=3,
    )
    # User 0: 0 and 1 (liked) are out, 2 (disliked) stays: top 3 = 2, 3, 4; one hit of two,
    # at position 3. User 1: 7 is out: top 3 = 6, 5, 4, three hits of four. User 2: 5 is
    # out: top 3 = 3, 7, 6, no hit.
    recalls = [1 / 2, 3 / 3, 0.0]
    ndcgs = [(1 / math.log2(4)) / (1 + 1 / math.log2(3)), 1.0, 0.0]
    assert metrics["holdout_users"] == 3
    assert metrics["holdout_recall@3"] == pytest.approx(sum(recalls) / 3, abs=1e-12)
    assert metrics["holdout_ndcg@3"] == pytest.approx(sum(ndcgs) / 3, abs=1e-12)


def reference_metrics(user_vectors, candidates, train, held, k):
    """recall@k, NDCG@k averaged over users with held-out likes: a plain loop over users and a full sort."""
    recalls, ndcgs = [], []
    for user in sorted({u for u, _, r in held if r >= THRESHOLD}):
        relevant = {i for u, i, r in held if u == user and r >= THRESHOLD}
        excluded = {i for u, i, r in train if u == user and r >= THRESHOLD}
        scores = candidates @ user_vectors[user]
        ranking = [int(i) for i in np.argsort(-scores, kind="stable") if int(i) not in excluded][:k]
        hits = [position for position, item in enumerate(ranking, start=1) if item in relevant]
        ideal = sum(1 / math.log2(position + 1) for position in range(1, min(k, len(relevant)) + 1))
        recalls.append(len(hits) / min(k, len(relevant)))
        ndcgs.append(sum(1 / math.log2(position + 1) for position in hits) / ideal)
    return float(np.mean(recalls)), float(np.mean(ndcgs)), len(recalls)


def first_like_of_each_user(entries):
    firsts = {}
    for position, (user, _, rating) in enumerate(entries):
        if rating >= THRESHOLD:
            firsts.setdefault(user, position)
    mask = np.zeros(len(entries), dtype=bool)
    mask[list(firsts.values())] = True
    return mask


@pytest.mark.parametrize("model", ["implicit", "cooccurrence", "nmf"])
def test_random_cases_match_an_independent_ranking(client, tmp_path, model):
    """30 users in four blocks, 25 items, k = 10: users table, item profiles, and nmf's contexts."""
    rng = np.random.default_rng(11)
    n_users, n_items, rank, k = 30, 25, 3, 10
    # float32 as published, then float64 as evaluated.
    items = rng.normal(size=(n_items, rank)).astype(np.float32).astype(np.float64)
    vectors = {"items": items}
    if model == "implicit":
        vectors["users"] = rng.normal(size=(n_users, rank)).astype(np.float32).astype(np.float64)
    if model == "nmf":
        vectors["contexts"] = rng.normal(size=(n_items, rank)).astype(np.float32).astype(np.float64)
    entries = [
        (user, item, float(rng.integers(1, 6)))
        for user in range(n_users)
        for item in rng.choice(n_items, size=rng.integers(4, 12), replace=False)
    ]
    # Every user keeps a like in training: a user without one has a zero profile, so every
    # candidate ties and its top k is topk's tie order (a case this comparison cannot judge).
    is_held = (rng.random(len(entries)) < 0.3) & ~first_like_of_each_user(entries)
    train = [entry for entry, out in zip(entries, is_held, strict=True) if not out]
    held = [entry for entry, out in zip(entries, is_held, strict=True) if out]

    if model == "implicit":
        user_vectors = vectors["users"]
    else:
        user_vectors = np.zeros((n_users, rank))
        for user, item, rating in train:
            if rating >= THRESHOLD:
                user_vectors[user] += items[item]
    candidates = vectors.get("contexts", items)
    recall, ndcg, scored = reference_metrics(user_vectors, candidates, train, held, k)
    metrics = evaluate(client, tmp_path, model, vectors, train, held, n_users=n_users, block_size=8, k=k)
    assert metrics["holdout_users"] == scored >= 15
    assert 0 < recall < 1 and 0 < ndcg < 1
    assert metrics[f"holdout_recall@{k}"] == pytest.approx(recall, abs=1e-12)
    assert metrics[f"holdout_ndcg@{k}"] == pytest.approx(ndcg, abs=1e-12)
