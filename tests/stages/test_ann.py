"""The ANN index of the items: inner-product search that ranks like the model's prediction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mf_dist.errors import ConfigError
from mf_dist.stages.ann import build_ann, load_index, query_vectors
from mf_dist.storage.reader import read_embeddings, resolve_run_dir
from tests.support.recommend import brute_force_scores, publish_user_item_run

N_USERS, N_ITEMS, RANK, K = 40, 500, 8, 10


def search(index, manifest, queries: np.ndarray, k: int) -> np.ndarray:
    if manifest["kind"] == "faiss":
        return index.search(queries, k)[1]
    return index.knn_query(queries, k=k)[0].astype(np.int64)


@pytest.mark.parametrize("kind", ["faiss", "hnsw"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["dot", "biases"])
def test_the_index_finds_the_best_predicted_items(client, tmp_path, kind, with_bias):
    rng = np.random.default_rng(3)
    extra = {}
    if with_bias:
        extra = dict(
            model="explicit",
            user_bias=rng.normal(size=N_USERS).astype(np.float32),
            item_bias=rng.normal(size=N_ITEMS).astype(np.float32),
            global_mean=3.0,
        )
    run = publish_user_item_run(
        client,
        tmp_path / "out",
        tmp_path / "work",
        list(range(N_USERS)),
        [f"item-{i}" for i in range(N_ITEMS)],
        rng.normal(size=(N_USERS, RANK)),
        rng.normal(size=(N_ITEMS, RANK)),
        pd.DataFrame({"user": [0], "item": [0], "rating": [1.0]}),
        block_size=64,
        **extra,
    )

    result = build_ann(client, tmp_path / "out", kind)

    index, manifest = load_index(resolve_run_dir(tmp_path / "out", "ann"))
    assert manifest["source"]["run_id"] == run.export.run_id and manifest["dim"] == RANK + with_bias
    assert (
        result.items == N_ITEMS and (tmp_path / "out" / "ann" / "LATEST").read_text().strip() == result.run_id
    )
    users = read_embeddings(tmp_path / "out", "users")
    found = search(index, manifest, query_vectors(users.vectors, users.bias), K)
    expected = np.argsort(-brute_force_scores(run), axis=1, kind="stable")[:, :K]
    recall = np.mean([len(set(f) & set(e)) / K for f, e in zip(found, expected, strict=True)])
    assert recall >= 0.95, recall
    ids = pd.read_parquet(tmp_path / "out" / "ann" / "runs" / result.run_id / "items.parquet").item_id
    assert ids.tolist() == run.item_ids


def test_an_unknown_kind_is_refused(client, tmp_path):
    with pytest.raises(ConfigError, match="unknown ANN index"):
        build_ann(client, tmp_path, "annoy")


def test_the_ann_command_indexes_a_published_items_table(client, tmp_path):
    from typer.testing import CliRunner

    from mf_dist import cli
    from tests.support.published import publish_items

    rng = np.random.default_rng(4)
    publish_items(client, tmp_path, list(range(30)), rng.normal(size=(30, 4)).astype(np.float32))

    result = CliRunner().invoke(
        cli.app, ["ann", str(tmp_path), "--kind", "hnsw", "--scheduler", client.scheduler.address]
    )

    assert result.exit_code == 0, result.output
    assert "hnsw index of 30 items (4 dimensions)" in result.output
    index, manifest = load_index(resolve_run_dir(tmp_path, "ann"))
    assert manifest["query"] == "users.embedding" and index.get_current_count() == 30
