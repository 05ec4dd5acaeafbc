"""What one real flow run publishes, read the ways downstream users read it.

One explicit-model run (users and items, with biases) plus the optional
neighbours and recommendations stages, on a real cluster and a temporary Prefect server. Every
reader must see the same ids and exactly the same float32 values, the
documented prediction rule must work in SQL, and the neighbours must be the
brute-force ones of the published vectors.
"""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest

from mf_dist import read_embeddings
from mf_dist.config import load_config
from mf_dist.flows.pipeline import PipelineSummary, factorization_pipeline
from mf_dist.stages.export import LOSS_CURVE_FILE
from mf_dist.storage.reader import read_published
from tests.support.data import write_input
from tests.support.neighbors import assert_matches_brute_force

ID_COLUMNS = {"items": "item_id", "users": "user_id"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flow_run(
    prefect_server, client, tmp_path_factory, tiny_ratings
) -> tuple[PipelineSummary, object, object]:
    directory = tmp_path_factory.mktemp("flow")
    source = write_input(tiny_ratings, directory / "in")
    config = load_config(
        None,
        input=str(source),
        output=str(directory / "out"),
        model="explicit",
        rank=4,
        epochs=2,
        block_size=100,
        scheduler=client.scheduler.address,
        neighbors=3,
        recommend=5,
        ann="hnsw",
    )
    return factorization_pipeline(config), directory / "out", tiny_ratings


@pytest.mark.parametrize("table", ["items", "users"])
def test_every_reader_sees_the_same_ids_and_exact_values(flow_run, table):
    summary, output, ratings = flow_run
    embeddings = read_embeddings(output, table)
    id_column = ID_COLUMNS[table]
    assert embeddings.manifest["run_id"] == summary.run_id
    assert set(embeddings.ids.tolist()) == set(ratings[id_column]) and len(set(embeddings.ids)) == len(
        embeddings
    )
    assert embeddings.vectors.shape == (len(embeddings), 4) and np.isfinite(embeddings.vectors).all()
    run_dir = embeddings.path
    by_reader = {
        "pyarrow": pq.read_table(run_dir).to_pandas(),
        "pandas": pd.read_parquet(run_dir),
        "polars": pl.read_parquet(f"{run_dir}/*.parquet").to_pandas(),
        "duckdb": duckdb.sql(f"SELECT * FROM read_parquet('{run_dir}/*.parquet')").df(),
    }
    for reader, frame in by_reader.items():
        assert frame[id_column].tolist() == embeddings.ids.tolist(), reader
        vectors = np.stack(frame["embedding"].to_numpy()).astype(np.float32)
        np.testing.assert_array_equal(vectors, embeddings.vectors, err_msg=reader)
        np.testing.assert_array_equal(frame["bias"].to_numpy(np.float32), embeddings.bias, err_msg=reader)
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    assert manifest["loss_curve"] == LOSS_CURVE_FILE and (run_dir / LOSS_CURVE_FILE).stat().st_size > 1000


def test_the_documented_prediction_rule_runs_in_duckdb(flow_run):
    _, output, ratings = flow_run
    users, items = read_embeddings(output, "users"), read_embeddings(output, "items")
    global_mean = items.manifest["global_mean"]
    assert users.manifest["global_mean"] == global_mean
    rank = items.rank
    predicted = duckdb.sql(
        f"""
        SELECT r.user_id, r.item_id,
               {global_mean}::DOUBLE + u.bias + i.bias
                 + array_inner_product(u.embedding::FLOAT[{rank}], i.embedding::FLOAT[{rank}]) AS predicted
        FROM ratings r
        JOIN read_parquet('{users.path}/*.parquet') u USING (user_id)
        JOIN read_parquet('{items.path}/*.parquet') i USING (item_id)
        ORDER BY r.user_id, r.item_id
        """
    ).df()
    assert len(predicted) == len(ratings)
    user_row = {user: row for row, user in enumerate(users.ids)}
    item_row = {item: row for row, item in enumerate(items.ids)}
    u = np.array([user_row[user] for user in predicted.user_id])
    i = np.array([item_row[item] for item in predicted.item_id])
    expected = (
        global_mean
        + users.bias[u].astype(np.float64)
        + items.bias[i].astype(np.float64)
        + np.einsum("nk,nk->n", users.vectors[u].astype(np.float64), items.vectors[i].astype(np.float64))
    )
    np.testing.assert_allclose(predicted.predicted.to_numpy(), expected, rtol=1e-5, atol=1e-5)


def test_the_neighbors_stage_publishes_brute_force_neighbours_of_the_run(flow_run):
    summary, output, _ = flow_run
    assert summary.neighbors is not None and summary.neighbors.run_id == summary.run_id
    assert "neighbors" in [stage.name for stage in summary.stages]
    _, manifest, _ = read_published(output, "neighbors")
    assert manifest["source"]["run_id"] == summary.run_id
    items = read_embeddings(output, "items")
    assert_matches_brute_force(output, items.ids.tolist(), items.vectors, "cosine", k=3)


def test_the_recommendations_stage_publishes_each_users_best_unrated_items(flow_run):
    summary, output, ratings = flow_run
    assert summary.recommendations is not None and summary.recommendations.run_id == summary.run_id
    # One commit: every table's LATEST names the run, moved after all were written.
    for table in ("users", "items", "neighbors", "recommendations", "ann"):
        assert (output / table / "LATEST").read_text().strip() == summary.run_id
    assert [stage.name for stage in summary.stages][-3:] == ["neighbors", "recommendations", "ann"]
    assert summary.ann is not None and summary.ann.kind == "hnsw" and summary.ann.dim == 5
    assert "recommendations" in [stage.name for stage in summary.stages]
    table, manifest, _ = read_published(output, "recommendations")
    assert manifest["source"]["run_id"] == summary.run_id and manifest["seen"] == "rated"
    users, items = read_embeddings(output, "users"), read_embeddings(output, "items")
    predicted = (
        items.manifest["global_mean"]
        + users.bias.astype(np.float64)[:, None]
        + items.bias.astype(np.float64)[None, :]
        + users.vectors.astype(np.float64) @ items.vectors.astype(np.float64).T
    )
    user_row = {user: row for row, user in enumerate(users.ids)}
    item_row = {item: row for row, item in enumerate(items.ids)}
    predicted[
        [user_row[user] for user in ratings.user_id], [item_row[item] for item in ratings.item_id]
    ] = -np.inf
    frame = table.to_pandas()
    assert frame.user_id.tolist() == np.repeat(users.ids, 5).tolist()
    best = np.argsort(-predicted, axis=1, kind="stable")[:, :5]
    assert frame.item_id.tolist() == items.ids[best].reshape(-1).tolist()
    np.testing.assert_allclose(
        frame.score.to_numpy(), np.take_along_axis(predicted, best, 1).reshape(-1), rtol=1e-5, atol=1e-5
    )
