"""The recommendations stage against brute force on small runs, its seen filter, ties and publication."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mf_dist.errors import ConfigError, OutputError
from mf_dist.stages import recommend as recommend_module
from mf_dist.stages.recommend import recommend_items
from mf_dist.storage.reader import read_published
from mf_dist.storage.schema import recommendations_table_schema
from tests.support.recommend import brute_force_recommendations, publish_user_item_run


@pytest.fixture
def small_parts(monkeypatch):
    """Several source part files, output part files and item groups on tiny data."""
    monkeypatch.setattr("mf_dist.stages.export.TARGET_PART_BYTES", 600)
    monkeypatch.setattr(recommend_module, "TARGET_PART_BYTES", 2000)
    monkeypatch.setattr(recommend_module, "CANDIDATE_GROUP_BYTES", 300)


def random_ratings(rng, n_users, n_items, per_user, levels=(1.0, 2.0, 3.0, 4.0, 5.0)) -> pd.DataFrame:
    rows = [
        (user, int(item), float(rng.choice(levels)))
        for user in range(n_users)
        for item in rng.choice(n_items, size=per_user, replace=False)
    ]
    return pd.DataFrame(rows, columns=["user", "item", "rating"])


def published_frame(output) -> tuple[pd.DataFrame, dict]:
    table, manifest, _ = read_published(output, "recommendations")
    return table.to_pandas(), manifest


def assert_frames_equal(got: pd.DataFrame, expected: pd.DataFrame, tolerance: float = 1e-5) -> None:
    assert got.user_id.tolist() == expected.user_id.tolist()
    assert got.item_id.tolist() == expected.item_id.tolist()
    assert got["rank"].tolist() == expected["rank"].tolist()
    np.testing.assert_allclose(
        got.score.to_numpy(), expected.score.to_numpy(), rtol=tolerance, atol=tolerance
    )


def explicit_run(client, tmp_path, rng, n_users=29, n_items=41, rank=4):
    ratings = random_ratings(rng, n_users, n_items, per_user=6)
    return publish_user_item_run(
        client,
        tmp_path / "out",
        tmp_path / "work",
        [int(i) for i in rng.choice(100_000, size=n_users, replace=False)],
        [int(i) for i in rng.choice(100_000, size=n_items, replace=False)],
        rng.normal(size=(n_users, rank)),
        rng.normal(size=(n_items, rank)),
        ratings,
        model="explicit",
        user_bias=rng.normal(size=n_users).astype(np.float32),
        item_bias=rng.normal(size=n_items).astype(np.float32),
        global_mean=3.25,
        block_size=8,
    )


def test_explicit_equals_brute_force_with_biases_and_rated_items_left_out(client, tmp_path, small_parts):
    run = explicit_run(client, tmp_path, np.random.default_rng(0))

    result = recommend_items(client, tmp_path / "out", 7, work_dir=run.work_dir, block_size=5)

    got, manifest = published_frame(tmp_path / "out")
    assert_frames_equal(got, brute_force_recommendations(run, 7, seen=run.ratings))
    assert result.rows == 29 * 7 and len(result.files) > 1 and result.seen == "rated"
    assert manifest["score"] == "predicted rating" and manifest["ties"] == "item_id ascending"
    assert manifest["source"]["run_id"] == run.export.run_id and manifest["users_short"] == 0
    assert (tmp_path / "out" / "recommendations" / "LATEST").read_text().strip() == result.run_id
    seen = set(
        zip(
            run.ratings.user.map(run.user_ids.__getitem__),
            run.ratings.item.map(run.item_ids.__getitem__),
            strict=True,
        )
    )
    assert not seen & set(zip(got.user_id, got.item_id, strict=True))


@pytest.mark.parametrize("workers", [1, 2])
def test_keep_seen_is_the_plain_top_n_on_any_number_of_workers(clients, tmp_path, small_parts, workers):
    run = explicit_run(clients[workers], tmp_path, np.random.default_rng(1))

    result = recommend_items(clients[workers], tmp_path / "out", 5, keep_seen=True, block_size=6)

    got, manifest = published_frame(tmp_path / "out")
    assert_frames_equal(got, brute_force_recommendations(run, 5, seen=None))
    assert result.seen == "kept" and manifest["source"]["work_dir"] is None


def test_implicit_leaves_out_only_the_liked_items(client, tmp_path, small_parts):
    rng = np.random.default_rng(2)
    ratings = random_ratings(rng, 17, 23, per_user=8)
    run = publish_user_item_run(
        client,
        tmp_path / "out",
        tmp_path / "work",
        [f"user-{i}" for i in range(17)],
        [f"item-{i:03d}" for i in rng.permutation(23)],
        rng.normal(size=(17, 3)),
        rng.normal(size=(23, 3)),
        ratings,
        model="implicit",
        like_threshold=4.0,
        block_size=4,
    )

    recommend_items(client, tmp_path / "out", 6, work_dir=run.work_dir, block_size=3)

    got, manifest = published_frame(tmp_path / "out")
    liked = ratings[ratings.rating >= 4.0]
    assert_frames_equal(got, brute_force_recommendations(run, 6, seen=liked))
    assert manifest["seen"] == "liked" and manifest["score"] == "dot"
    assert (
        got.merge(
            ratings.assign(
                user_id=ratings.user.map(run.user_ids.__getitem__),
                item_id=ratings.item.map(run.item_ids.__getitem__),
            ).query("rating < 4"),
            on=["user_id", "item_id"],
        ).shape[0]
        > 0
    ), "disliked items may be recommended"


def test_ties_go_by_item_id_and_a_user_with_nothing_unseen_gets_no_rows(client, tmp_path):
    # Items in the table's row order 5, 3, 9, 1, 7, ... with two groups of identical vectors.
    item_ids = [5, 3, 9, 1, 7, 0, 8]
    items = np.array([[1, 0], [1, 0], [0, 1], [1, 0], [0, 1], [0.5, 0], [0, 0]], np.float32)
    users = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
    # User 1 has seen everything; user 2 all but two items.
    ratings = pd.DataFrame(
        [(1, item, 1.0) for item in range(7)] + [(2, item, 1.0) for item in (0, 1, 2, 3, 4)],
        columns=["user", "item", "rating"],
    )
    run = publish_user_item_run(
        client,
        tmp_path / "out",
        tmp_path / "work",
        [10, 11, 12],
        item_ids,
        users,
        items,
        ratings,
        block_size=2,
    )

    result = recommend_items(client, tmp_path / "out", 4, work_dir=run.work_dir, block_size=2)

    got, manifest = published_frame(tmp_path / "out")
    assert_frames_equal(got, brute_force_recommendations(run, 4, seen=ratings))
    assert got[got.user_id == 10].item_id.tolist() == [1, 3, 5, 0]  # three ties at 1, by id
    assert 11 not in set(got.user_id)
    assert got[got.user_id == 12].item_id.tolist() == [0, 8]
    assert result.users_short == 2 and manifest["users_short"] == 2
    assert result.rows == 6


def test_given_users_only_unknown_ids_skipped(client, tmp_path):
    run = explicit_run(client, tmp_path, np.random.default_rng(4), n_users=12, n_items=9)
    wanted = [run.user_ids[7], run.user_ids[2], 123_456_789, run.user_ids[7]]

    result = recommend_items(client, tmp_path / "out", 3, work_dir=run.work_dir, users=wanted, block_size=4)

    got, manifest = published_frame(tmp_path / "out")
    expected = brute_force_recommendations(run, 3, seen=run.ratings)
    assert_frames_equal(got, expected[expected.user_id.isin(wanted)].reset_index(drop=True))
    assert result.users == 2 and manifest["users_unknown"] == 1
    table, _, _ = read_published(tmp_path / "out", "recommendations")
    assert table.schema.remove_metadata().equals(
        recommendations_table_schema(*[table.schema.field(0).type] * 2)
    )


def test_seen_items_need_the_runs_own_ingest(client, tmp_path):
    run = explicit_run(client, tmp_path, np.random.default_rng(5), n_users=10, n_items=8)
    with pytest.raises(ConfigError, match="--keep-seen"):
        recommend_items(client, tmp_path / "out", 3)
    with pytest.raises(ConfigError, match="no ingest output"):
        recommend_items(client, tmp_path / "out", 3, work_dir=tmp_path / "elsewhere")
    other = explicit_run(client, tmp_path / "other", np.random.default_rng(6), n_users=11, n_items=8)
    with pytest.raises(ConfigError, match="not the one run"):
        recommend_items(client, tmp_path / "out", 3, work_dir=other.work_dir)
    assert not (tmp_path / "out" / "recommendations").exists() or not any(
        (tmp_path / "out" / "recommendations" / "runs").iterdir()
    )
    assert run.export.run_id


def test_unpublished_run_is_read_by_run_id_and_leaves_latest_to_the_caller(client, tmp_path):
    """The flow's order: export without LATEST, recommendations from that run, then one commit."""
    from mf_dist.stages.export import publish_tables

    run = explicit_run(client, tmp_path, np.random.default_rng(9), n_users=9, n_items=7)
    output = tmp_path / "out"
    for table in ("users", "items"):
        (output / table / "LATEST").unlink()  # as if export had not moved them yet

    result = recommend_items(
        client, output, 3, work_dir=run.work_dir, source_run_id=run.export.run_id, run_id="r2", publish=False
    )

    assert (output / "recommendations" / "runs" / "r2" / "_manifest.json").is_file()
    assert not (output / "recommendations" / "LATEST").exists()
    with pytest.raises(OutputError, match="missing"):
        publish_tables(output, ["users", "items", "recommendations"], "r3")
    assert not (output / "users" / "LATEST").exists()
    assert result.source_run_id == run.export.run_id


@pytest.mark.parametrize("keep", [1, 3, 7, 20])
def test_block_top_keeps_the_lowest_columns_among_ties_at_the_cut(keep):
    """Against a stable full sort, on scores with many ties (small integers) and −inf entries."""
    import torch

    rng = np.random.default_rng(keep)
    scores = torch.from_numpy(rng.integers(0, 4, size=(50, 20)).astype(np.float32))
    scores[torch.from_numpy(rng.random((50, 20)) < 0.2)] = float("-inf")

    values, columns = recommend_module.block_top(scores, keep)

    expected_values, expected_columns = torch.sort(scores, dim=1, descending=True, stable=True)
    for row in range(50):
        finite = torch.isfinite(expected_values[row, :keep])
        got = sorted(zip((-values[row]).tolist(), columns[row].tolist(), strict=True))
        got_columns = [column for _, column in got][: int(finite.sum())]
        assert got_columns == expected_columns[row, :keep][finite].tolist()


@pytest.mark.parametrize("with_running", [False, True])
def test_compiled_and_torch_merges_give_the_same_top_n(with_running):
    """The CPU's compiled merge against the torch path, on tied scores, seen items and several item blocks."""
    from mf_dist.stages.recommend import (
        ItemBlock,
        QueryBlock,
        Seen,
        fold_items_compiled,
        fold_items_torch,
    )

    rng = np.random.default_rng(7)
    users, items, rank, n, block = 23, 60, 3, 9, 16
    # Small integers: many equal scores, so the tie rule decides.
    user_vectors = rng.integers(-2, 3, (users, rank)).astype(np.float32)
    item_vectors = rng.integers(-2, 3, (items, rank)).astype(np.float32)
    item_bias = rng.integers(0, 2, items).astype(np.float32)
    tie_keys = rng.permutation(items).astype(np.int64)
    query = QueryBlock(np.arange(users), user_vectors, np.ones(users, np.float32), "cpu")

    def item_block(start: int) -> ItemBlock:
        stop = min(start + block, items)
        rows = np.arange(start, stop)
        order = np.argsort(tie_keys[rows], kind="stable")
        return ItemBlock(
            start,
            rows[order],
            tie_keys[rows[order]],
            item_vectors[rows[order]],
            item_bias[rows[order]],
            "cpu",
        )

    blocks = [item_block(start) for start in range(0, items, block)]
    positions = np.repeat(np.arange(users), 12)
    seen = Seen(positions, rng.integers(0, items, len(positions)).astype(np.int64))
    first, rest = (blocks[:2], blocks[2:]) if with_running else ([], blocks)
    running = fold_items_torch(None, query, seen, first, n, 0.5) if first else None

    compiled = fold_items_compiled(running, query, seen, rest, n, 0.5)
    reference = fold_items_torch(running, query, seen, rest, n, 0.5)

    np.testing.assert_array_equal(compiled.rows, reference.rows)
    np.testing.assert_array_equal(compiled.tie, reference.tie)
    np.testing.assert_array_equal(compiled.scores, reference.scores)
    assert (compiled.rows >= 0).all() and np.isfinite(compiled.scores).all()
