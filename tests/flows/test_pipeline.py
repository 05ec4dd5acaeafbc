"""The Prefect flow end to end on a real cluster and a real (temporary) Prefect server.

The published tables are read back with pyarrow and checked against the
documented schema and manifest, and against the input: every id appears
once, and the factors reproduce the loss the run reported.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from mf_dist.config import load_config
from mf_dist.flows.pipeline import PipelineSummary, factorization_pipeline
from mf_dist.registry import MODELS
from mf_dist.storage.schema import FORMAT_VERSION, embedding_table_schema

MANIFEST_KEYS = {
    "format_version",
    "run_id",
    "table",
    "model",
    "rank",
    "config",
    "loss_history",
    "row_count",
    "created_at",
    "input_fingerprint",
}


def run_pipeline(client, source: Path, output: Path, model: str, **settings: object) -> PipelineSummary:
    config = load_config(
        None,
        input=str(source),
        output=str(output),
        model=model,
        rank=4,
        block_size=100,
        scheduler=client.scheduler.address,
        **{"epochs": 8 if model == "cooccurrence" else 3, **settings},
    )
    return factorization_pipeline(config)


def read_current(output: Path, table: str) -> tuple[pa.Table, dict]:
    """Read a table the way the README tells a downstream reader to."""
    run_id = (output / table / "LATEST").read_text().strip()
    directory = output / table / "runs" / run_id
    manifest = json.loads((directory / "_manifest.json").read_text())
    return pq.read_table(directory), manifest


def embeddings_by_id(table: pa.Table, id_column: str) -> dict[object, np.ndarray]:
    ids = table[id_column].to_pylist()
    vectors = table["embedding"].combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
    return dict(zip(ids, vectors, strict=True))


@pytest.mark.parametrize("model", ["cooccurrence", "explicit"])
def test_published_tables_follow_the_contract(
    prefect_server, client, tmp_path, tiny_input, tiny_ratings, model
):
    output = tmp_path / "out"
    summary = run_pipeline(client, tiny_input, output, model)

    expected = {"cooccurrence": ["items"], "explicit": ["items", "users"]}[model]
    assert sorted(t.name for t in summary.export.tables) == expected
    for name in expected:
        table, manifest = read_current(output, name)
        id_column = {"items": "item_id", "users": "user_id"}[name]
        assert manifest["run_id"] == summary.run_id
        assert set(manifest) >= MANIFEST_KEYS
        assert manifest["format_version"] == FORMAT_VERSION
        assert (manifest["model"], manifest["rank"], manifest["table"]) == (model, 4, name)
        epochs = [r["epoch"] for r in manifest["loss_history"]]
        assert epochs == list(range(epochs[0], summary.epochs + 1)) and epochs[0] in (0, 1)
        with_bias = MODELS[model].has_global_mean
        schema = embedding_table_schema(id_column, pa.int64(), 4, with_bias=with_bias)
        assert table.schema.remove_metadata().equals(schema), table.schema
        ids = table[id_column].to_numpy()
        assert len(np.unique(ids)) == len(ids) == manifest["row_count"]
        assert set(ids) == set(tiny_ratings[id_column])
        assert np.isfinite(table["embedding"].combine_chunks().flatten().to_numpy()).all()
    assert not list(output.glob("*/runs/.*")), "a partial run directory was left behind"


def test_cooccurrence_factors_reproduce_the_reported_loss(
    prefect_server, client, tmp_path, tiny_input, tiny_ratings
):
    """Σ_{i≠j}(v_i·v_j − X_ij)² from the published table and X from the raw input."""
    output = tmp_path / "out"
    summary = run_pipeline(client, tiny_input, output, "cooccurrence")
    table, manifest = read_current(output, "items")
    vectors = embeddings_by_id(table, "item_id")

    items = np.array(sorted(vectors))
    users = np.unique(tiny_ratings.user_id)
    liked = sp.csr_matrix(
        (
            np.ones(len(tiny_ratings)),
            (np.searchsorted(users, tiny_ratings.user_id), np.searchsorted(items, tiny_ratings.item_id)),
        ),
        shape=(len(users), len(items)),
    )
    cooccurrence = (liked.T @ liked).toarray()
    v = np.stack([vectors[i] for i in items]).astype(np.float64)
    residual = v @ v.T - cooccurrence
    np.fill_diagonal(residual, 0.0)
    loss = float((residual**2).sum())

    assert loss == pytest.approx(summary.final_loss, rel=1e-4)
    assert loss == pytest.approx(manifest["metrics"]["final_loss"], rel=1e-4)
    assert loss < manifest["loss_history"][0]["loss"]


def test_explicit_tables_predict_with_the_documented_rule(
    prefect_server, client, tmp_path, tiny_input, tiny_ratings
):
    """r̂ = global_mean + b_u + b_i + u·v from the published tables beats the global mean."""
    output = tmp_path / "out"
    run_pipeline(client, tiny_input, output, "explicit", epochs=8)
    items, item_manifest = read_current(output, "items")
    users, user_manifest = read_current(output, "users")
    assert item_manifest["global_mean"] == user_manifest["global_mean"]
    item_frame = pd.DataFrame({"item_id": items["item_id"].to_numpy(), "item_bias": items["bias"].to_numpy()})
    user_frame = pd.DataFrame({"user_id": users["user_id"].to_numpy(), "user_bias": users["bias"].to_numpy()})
    item_vectors = embeddings_by_id(items, "item_id")
    user_vectors = embeddings_by_id(users, "user_id")

    ratings = tiny_ratings.merge(item_frame, on="item_id").merge(user_frame, on="user_id")
    assert len(ratings) == len(tiny_ratings)
    dots = np.array(
        [user_vectors[u] @ item_vectors[i] for u, i in zip(ratings.user_id, ratings.item_id, strict=True)]
    )
    predicted = item_manifest["global_mean"] + ratings.user_bias + ratings.item_bias + dots
    rmse = float(np.sqrt(np.mean((predicted - ratings.rating) ** 2)))
    baseline = float(np.sqrt(np.mean((tiny_ratings.rating - tiny_ratings.rating.mean()) ** 2)))
    last_epoch_rmse = item_manifest["loss_history"][-1]["metrics"]["train_rmse"]
    assert rmse < 0.95 * baseline
    assert rmse < 1.05 * last_epoch_rmse


def test_a_second_run_moves_latest_and_keeps_the_first(prefect_server, client, tmp_path, tiny_input):
    output = tmp_path / "out"
    first = run_pipeline(client, tiny_input, output, "cooccurrence", epochs=2)
    second = run_pipeline(client, tiny_input, output, "cooccurrence", epochs=2, seed=1)
    assert first.run_id != second.run_id
    assert (output / "items" / "LATEST").read_text().strip() == second.run_id
    assert sorted(p.name for p in (output / "items" / "runs").iterdir()) == sorted(
        [first.run_id, second.run_id]
    )
