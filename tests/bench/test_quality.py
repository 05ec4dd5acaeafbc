"""Rating prediction quality on real data: MovieLens 100K, a random 80/20 split.

Both explicit solvers (ALS with either row solve) run with their defaults (no tuning in this test) through
the real stages on a real cluster; the held-out RMSE is computed from the
published tables with the documented prediction rule.
"""

from __future__ import annotations

import pytest

from mf_dist.config import load_config
from mf_dist.stages.evaluation import explicit_rating_errors, random_split
from mf_dist.stages.export import export_tables
from mf_dist.stages.ingest import ingest_ratings
from mf_dist.stages.train import train_factors


@pytest.mark.parametrize(
    ("solver", "als_method"),
    [("als", None), ("als", "cg"), ("gradient", None)],
    ids=["als", "als-cg", "gradient"],
)
def test_movielens_100k_holdout_rmse(client, tmp_path, movielens_100k, solver, als_method):
    train, held_out = random_split(movielens_100k, 0.2, seed=0)
    source = tmp_path / "train.parquet"
    train.to_parquet(source)
    config = load_config(
        None,
        input=str(source),
        output=str(tmp_path / "out"),
        model="explicit",
        solver=solver,
        als_method=als_method,
    )
    ingest = ingest_ratings(client, str(source), config.resolved_work_dir, block_size=1024)
    trained = train_factors(client, config.resolved_work_dir, config.train_settings)
    export_tables(
        client, trained, ingest, config.output, run_id="holdout", config=config.model_dump(mode="json")
    )

    errors = explicit_rating_errors(config.output, held_out)
    assert errors.n_skipped < 0.005 * len(held_out)
    print(f"{solver} {als_method}: held-out RMSE {errors.rmse:.4f}, MAE {errors.mae:.4f}")
    assert errors.rmse <= 0.91, f"{solver}: held-out RMSE {errors.rmse:.4f}"
    assert errors.mae < 0.75
