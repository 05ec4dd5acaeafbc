"""The neighbours stage against brute force on small tables, and its publication."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from mf_dist.errors import ConfigError, OutputError
from mf_dist.stages import neighbors as neighbors_module
from mf_dist.stages.neighbors import group_consecutive, item_neighbors, plan_blocks
from mf_dist.storage.reader import read_embeddings, read_published
from mf_dist.storage.schema import FORMAT_VERSION, neighbors_table_schema
from tests.support.neighbors import assert_matches_brute_force
from tests.support.published import publish_items


@pytest.fixture
def small_parts(monkeypatch):
    """Several source part files, output part files and candidate groups on tiny data."""
    monkeypatch.setattr("mf_dist.stages.export.TARGET_PART_BYTES", 600)
    monkeypatch.setattr(neighbors_module, "TARGET_PART_BYTES", 2000)
    monkeypatch.setattr(neighbors_module, "CANDIDATE_GROUP_BYTES", 300)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_neighbors_equal_brute_force(clients, tmp_path, small_parts, workers, metric):
    rng = np.random.default_rng(workers)
    vectors = rng.normal(size=(53, 5)).astype(np.float32)
    ids = [int(i) for i in rng.choice(10_000, size=53, replace=False)]
    publish_items(clients[workers], tmp_path, ids, vectors, block_size=8)
    source_parts = json.loads(
        next((tmp_path / "items" / "runs").iterdir()).joinpath("_manifest.json").read_text()
    )
    assert len(source_parts["files"]) > 2, "the test is meant to cross part files"

    result = item_neighbors(clients[workers], tmp_path / "items", k=6, metric=metric, block_size=7)

    assert result.rows == 53 * 6 and len(result.files) > 1
    assert_matches_brute_force(tmp_path, ids, vectors, metric, k=6)


def test_ties_duplicates_zero_vectors_and_string_ids(client, tmp_path):
    rng = np.random.default_rng(3)
    base = rng.normal(size=(10, 4)).astype(np.float32)
    # Exact duplicates and scaled copies tie under cosine; a zero vector ties with everything at 0.
    vectors = np.concatenate([base, base[:3], 2 * base[3:5], np.zeros((1, 4), np.float32)])
    ids = [f"item-{i:02d}" for i in range(len(vectors))]
    publish_items(client, tmp_path, ids, vectors, block_size=4)

    item_neighbors(client, tmp_path, k=4, metric="cosine", block_size=3)

    assert_matches_brute_force(tmp_path, ids, vectors, "cosine", k=4)
    table, _, _ = read_published(tmp_path, "neighbors")
    assert table.schema.remove_metadata().equals(neighbors_table_schema(table.schema.field("item_id").type))
    best = table.to_pandas().query("rank == 1").set_index("item_id")
    # A duplicate's best neighbour is its twin, at cosine 1.
    assert best.loc["item-10", "neighbor_id"] == "item-00"
    assert best.loc["item-10", "score"] == pytest.approx(1.0, abs=1e-6)


def test_k_is_capped_at_the_other_items(client, tmp_path):
    vectors = np.eye(4, dtype=np.float32)[:, :3] + 0.1
    publish_items(client, tmp_path, [1, 2, 3, 4], vectors)
    result = item_neighbors(client, tmp_path, k=50, metric="dot")
    assert result.k == 3
    assert_matches_brute_force(tmp_path, [1, 2, 3, 4], vectors, "dot", k=3)
    assert read_published(tmp_path, "neighbors")[1]["k_requested"] == 50


def test_published_atomically_beside_the_items_table(client, tmp_path):
    vectors = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    items = publish_items(client, tmp_path, list(range(20)), vectors)
    first = item_neighbors(client, tmp_path / "items" / "runs" / items.run_id, k=2)
    second = item_neighbors(client, tmp_path, k=3, metric="dot")

    table_dir = tmp_path / "neighbors"
    assert (table_dir / "LATEST").read_text().strip() == second.run_id != first.run_id
    assert sorted(path.name for path in (table_dir / "runs").iterdir()) == sorted(
        [first.run_id, second.run_id]
    )
    _, manifest, run_dir = read_published(tmp_path, "neighbors")
    assert manifest["format_version"] == FORMAT_VERSION
    assert (manifest["metric"], manifest["k"], manifest["table"]) == ("dot", 3, "neighbors")
    assert manifest["source"]["run_id"] == items.run_id
    assert pq.ParquetFile(run_dir / manifest["files"][0]["name"]).metadata.num_row_groups == 1
    # The neighbours table is not an embedding table.
    with pytest.raises(OutputError, match="not an embedding table"):
        read_embeddings(tmp_path, "neighbors")


def test_progress_is_reported_per_query_block(client, tmp_path):
    publish_items(client, tmp_path, list(range(30)), np.ones((30, 2), np.float32))
    calls: list[tuple[int, int]] = []
    item_neighbors(
        client, tmp_path, k=2, block_size=8, on_block=lambda done, total: calls.append((done, total))
    )
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"metric": "euclid"}, ConfigError, "unknown similarity 'euclid'"),
        ({"k": 0}, ConfigError, "k must be at least 1"),
        ({"block_size": 0}, ConfigError, "block size"),
    ],
)
def test_bad_arguments_are_config_errors(client, tmp_path, arguments, error, message):
    publish_items(client, tmp_path, [1, 2, 3], np.ones((3, 2), np.float32))
    with pytest.raises(error, match=message):
        item_neighbors(client, tmp_path, **arguments)
    assert not (tmp_path / "neighbors").exists()


def test_a_path_without_items_is_an_output_error(client, tmp_path):
    with pytest.raises(OutputError, match="not an mf-dist table"):
        item_neighbors(client, tmp_path)


def test_block_plan_never_straddles_parts_and_groups_respect_the_budget():
    assert plan_blocks([5, 3], 2) == [
        (0, 0, 2, 0),
        (0, 2, 4, 2),
        (0, 4, 5, 4),
        (1, 0, 2, 5),
        (1, 2, 3, 7),
    ]
    assert group_consecutive([4, 4, 4, 9, 1], 8) == [[0, 1], [2], [3], [4]]
