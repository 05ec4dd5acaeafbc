"""Quality on real data: MovieLens 100K (skipped where ../shared/data has no copy).

The held-out RMSE of a random 80/20 split; and our figures of `mf-dist bench quality`
re-checked against those it recorded (tests/bench/quality_recorded.json).

Both explicit solvers (ALS with either row solve) run with their defaults (no tuning in this test) through
the real stages on a real cluster; the held-out RMSE is computed from the
published tables with the documented prediction rule.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mf_dist.bench.quality import RECORD_COMMAND, QualityReport, QualityRow, run_row
from mf_dist.bench.quality_data import MOVIELENS_100K, k_folds, read_ratings
from mf_dist.bench.quality_sides import Resources, ours_side
from mf_dist.config import load_config
from mf_dist.registry import model_spec
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


# --- our figures of `mf-dist bench quality`, re-checked --------------------------------------------

RECORDED = Path(__file__).with_name("quality_recorded.json")
RECHECKED_FOLDS = (0,)
"""Folds re-run here (each of our default-solver rows costs one pipeline run per fold)."""


def _recorded() -> QualityReport:
    return QualityReport.model_validate_json(RECORDED.read_text())


def _default_rows() -> list[QualityRow | None]:
    """Our rows at each model's default solver: the figures the README quotes (None: nothing recorded)."""
    if not RECORDED.exists():
        return [None]
    rows: list[QualityRow | None] = []
    for row in _recorded().rows:
        model, _, solver = row.side.partition("/")
        if row.kind == "ours" and solver == model_spec(model).default_solver:
            rows.append(row)
    return rows


@pytest.mark.parametrize("row", _default_rows(), ids=lambda row: row.side if row else "unrecorded")
def test_movielens_100k_figures_as_recorded(client, tmp_path, movielens_100k, row):
    """Our fold-0 figures against those recorded by the bench run, within two standard errors.

    The tolerance of each metric is 2·std/√k of the recorded folds: a re-run
    of the same fold should land far closer (same seed, same split); a
    change of defaults or of a solver that moves a figure by more than the
    split noise fails here, and is re-recorded with ``RECORD_COMMAND``.
    """
    assert row is not None, f"no {RECORDED.name}: record it with `{RECORD_COMMAND}`"
    recorded = _recorded()
    model, solver = row.side.split("/")
    split = k_folds(read_ratings(MOVIELENS_100K), recorded.folds, recorded.seed)
    resources = Resources(workers=len(client.scheduler_info()["workers"]), scratch=tmp_path, client=client)
    rerun = run_row(
        ours_side(model, solver, row.task), "defaults", {}, [split[i] for i in RECHECKED_FOLDS], resources
    )
    assert rerun.config == row.config, (
        f"{row.side}: the defaults changed ({rerun.config!r}, recorded {row.config!r}); "
        f"re-record with `{RECORD_COMMAND}`"
    )
    for metric, values in row.metrics.items():
        tolerance = 2 * row.standard_error(metric)
        for position, fold in enumerate(RECHECKED_FOLDS):
            measured, expected = rerun.metrics[metric][position], values[fold]
            print(
                f"{row.side} fold {fold} {metric}: {measured:.4f}, recorded {expected:.4f} ± {tolerance:.4f}"
            )
            assert abs(measured - expected) <= tolerance, (
                f"{row.side} fold {fold} {metric} {measured:.4f}, recorded {expected:.4f} ± {tolerance:.4f}; "
                f"if intended, re-record with `{RECORD_COMMAND}`"
            )
