"""Held-out evaluation: a reproducible split in ingest, metrics in the manifest and the summary."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mf_dist.config import load_config
from mf_dist.flows.pipeline import factorization_pipeline
from mf_dist.stages.evaluation import explicit_rating_errors
from mf_dist.stages.ingest import ingest_ratings
from mf_dist.storage.ingested import load_ingest_result
from mf_dist.storage.reader import read_embeddings


def read_blocks(folder):
    return pd.concat([pq.read_table(p).to_pandas() for p in sorted(folder.glob("*.parquet"))])


def test_split_is_reproducible_disjoint_and_about_the_share(client, tmp_path, tiny_input, tiny_ratings):
    first = ingest_ratings(client, str(tiny_input), tmp_path / "a", block_size=32, holdout=0.25, seed=3)
    ingest_ratings(client, str(tiny_input), tmp_path / "b", block_size=16, holdout=0.25, seed=3)
    other = ingest_ratings(client, str(tiny_input), tmp_path / "c", block_size=32, holdout=0.25, seed=4)
    assert first.n_ratings + first.n_held_out == len(tiny_ratings)
    assert abs(first.n_held_out / len(tiny_ratings) - 0.25) < 0.04
    held = read_blocks(tmp_path / "a" / "ingest" / "holdout")
    kept = read_blocks(tmp_path / "a" / "ingest" / "ratings")
    assert not set(zip(held.user, held.item, strict=True)) & set(zip(kept.user, kept.item, strict=True))
    # The same seed holds out the same pairs whatever the block size; another seed does not.
    held_again = read_blocks(tmp_path / "b" / "ingest" / "holdout")
    assert set(zip(held.user, held.item, strict=True)) == set(
        zip(held_again.user, held_again.item, strict=True)
    )
    assert other.n_held_out != first.n_held_out or not held.equals(
        read_blocks(tmp_path / "c" / "ingest" / "holdout")
    )
    assert first.global_mean == pytest.approx(kept.rating.mean(), rel=1e-6)


def run(client, source, output, model, **settings):
    config = load_config(
        None,
        input=str(source),
        output=str(output),
        model=model,
        rank=4,
        block_size=100,
        holdout=0.2,
        scheduler=client.scheduler.address,
        **settings,
    )
    return config, factorization_pipeline(config)


def test_explicit_holdout_rmse_matches_the_published_tables(prefect_server, client, tmp_path, tiny_input):
    config, summary = run(client, tiny_input, tmp_path / "out", "explicit", epochs=5)
    manifest = read_embeddings(tmp_path / "out", "items").manifest
    assert manifest["evaluation"] == summary.evaluation
    ingest = load_ingest_result(config.resolved_work_dir)
    held = read_blocks(config.resolved_work_dir / "ingest" / "holdout")
    users = pq.read_table(ingest.users_path).to_pandas().set_index("index")
    items = pq.read_table(ingest.items_path).to_pandas().set_index("index")
    held_ids = pd.DataFrame(
        {
            "user_id": users.loc[held.user, "user_id"].to_numpy(),
            "item_id": items.loc[held.item, "item_id"].to_numpy(),
            "rating": held.rating.to_numpy(),
        }
    )
    errors = explicit_rating_errors(tmp_path / "out", held_ids)
    assert errors.n_scored == summary.evaluation["holdout_ratings"] == ingest.n_held_out
    assert summary.evaluation["holdout_rmse"] == pytest.approx(errors.rmse, rel=1e-5)
    assert summary.evaluation["holdout_mae"] == pytest.approx(errors.mae, rel=1e-5)


@pytest.mark.parametrize("model", ["implicit", "cooccurrence"])
def test_ranking_metrics_beat_random(prefect_server, client, tmp_path, tiny_input, model):
    _, summary = run(client, tiny_input, tmp_path / "out", model, epochs=5)
    recall, ndcg = summary.evaluation["holdout_recall@10"], summary.evaluation["holdout_ndcg@10"]
    assert 0 <= ndcg <= 1 and 0 <= recall <= 1
    # A random ranking of ~300 items finds about 10/300 of the held-out likes.
    assert recall > 2 * 10 / 300
    assert np.isfinite(summary.evaluation["holdout_users"])
