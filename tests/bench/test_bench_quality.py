"""``mf-dist bench quality`` on a tiny generated ratings file: the real command, its table and JSON."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from mf_dist.bench.quality import QualityReport
from mf_dist.bench.quality_data import k_folds, read_ratings
from mf_dist.bench.quality_sides import item_knn_scores
from mf_dist.bench.synthetic import synthetic_ratings
from mf_dist.stages.scoring import ranking_metrics
from tests.support.paths import REPO

SIDES = ("explicit/als", "implicit/als", "cooccurrence/als", "popularity", "knn-cosine")
# knn-cosine is `implicit`'s CosineRecommender, an optional reference ([bench]); CI's [test] lacks it.
HAS_IMPLICIT = importlib.util.find_spec("implicit") is not None


def _quality(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mf_dist.cli", "bench", "quality", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
    )


@pytest.fixture(scope="module")
def ratings_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("quality") / "ratings.parquet"
    # Ratings 0.5–5 from a low-rank model: enough likes (≥ 4) for every side to have something to rank.
    synthetic_ratings(3000, n_users=60, n_items=300, seed=7, intercept=3.86)[
        ["user_id", "item_id", "rating"]
    ].to_parquet(path)
    return path


@pytest.fixture(scope="module")
def report(ratings_file: Path, tmp_path_factory) -> QualityReport:
    out = tmp_path_factory.mktemp("quality-out") / "quality.json"
    completed = _quality(
        "--data",
        str(ratings_file),
        "--folds",
        "2",
        "--sides",
        ",".join(SIDES),
        "--workers",
        "1",
        "--json",
        str(out),
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "mf-dist bench quality" in completed.stdout
    return QualityReport.model_validate_json(out.read_text())


def test_rows_and_ranges(report: QualityReport, ratings_file: Path):
    assert report.folds == 2 and report.n_ratings == len(read_ratings(ratings_file))
    by_side = {(row.side, row.choice): row for row in report.rows}
    # knn-cosine has a grid: a second row, chosen on the inner split, with what each point scored there.
    assert {side for side, _ in by_side} == set(SIDES)
    grid_rows = [row for row in report.rows if row.choice.startswith("best of grid")]
    if HAS_IMPLICIT:
        assert [row.side for row in grid_rows] == ["knn-cosine"]
        assert len(grid_rows[0].grid) == 4
    else:
        # A missing reference is one row that says how to get it, not a failure.
        assert grid_rows == []
        assert "pip install implicit" in (by_side[("knn-cosine", "defaults")].unavailable or "")
    for row in report.rows:
        if row.side == "knn-cosine" and not HAS_IMPLICIT:
            continue
        assert row.unavailable is None and row.failed is None, row
        assert len(row.seconds) == 2 and all(s >= 0 for s in row.seconds)
        if row.task == "explicit":
            assert list(row.metrics) == ["rmse"]
            assert all(0.3 < value < 2.5 for value in row.metrics["rmse"])
        else:
            assert list(row.metrics) == ["recall@10", "ndcg@10"]
            assert all(0 <= value <= 1 for values in row.metrics.values() for value in values)
        assert row.std(next(iter(row.metrics))) >= 0


def test_popularity_is_scored_by_the_shared_function(report: QualityReport, ratings_file: Path):
    """The popularity row, recomputed here by hand and through :func:`ranking_metrics`, agrees to the bit."""
    row = next(row for row in report.rows if row.side == "popularity")
    for fold in k_folds(read_ratings(ratings_file), 2, seed=0):
        likes = fold.train_likes.toarray()
        scores = np.tile(likes.sum(axis=0), (fold.n_users, 1))
        expected = ranking_metrics(scores, fold.train_seen, fold.test_likes, 10)
        assert row.metrics["recall@10"][fold.index] == expected.mean_recall
        assert row.metrics["ndcg@10"][fold.index] == expected.mean_ndcg
    # Ours went through the same function and found some held-out likes (on this heavy-tailed tiny
    # set, popularity itself is hard to beat: 0.25 against our item vectors' 0.10).
    ours = next(row for row in report.rows if row.side == "cooccurrence/als")
    assert ours.mean("recall@10") > 0.02


def test_item_knn_scores_are_sums_of_cosines():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(6, 3))
    vectors[4] = 0.0  # an item the table lacks: cosine 0 with everything
    likes = sp.csr_matrix(rng.random((5, 6)) < 0.4, dtype=np.float64)
    expected = np.zeros((5, 6))
    for user in range(5):
        for i in likes[user].indices:
            for j in range(6):
                norm = np.linalg.norm(vectors[i]) * np.linalg.norm(vectors[j])
                expected[user, j] += vectors[i] @ vectors[j] / norm if norm > 0 else 0.0
    np.testing.assert_allclose(item_knn_scores(likes, vectors), expected, atol=1e-12)


def test_folds_hold_every_rating_out_once(ratings_file: Path):
    ratings = read_ratings(ratings_file)
    folds = k_folds(ratings, 3, seed=5)
    held = sum(len(fold.test) + fold.dropped for fold in folds)
    assert held == len(ratings)
    for fold in folds:
        assert len(fold.train) + len(fold.test) + fold.dropped == len(ratings)
        assert set(fold.test["user"]) <= set(fold.train["user"])
    assert math.isclose(len(folds[0].train), len(ratings) * 2 / 3, abs_tol=1)


def test_a_missing_data_file_is_one_line_and_status_2(tmp_path: Path):
    completed = _quality("--data", str(tmp_path / "nope.tsv"))
    assert completed.returncode == 2
    assert f"{tmp_path / 'nope.tsv'}: no such ratings file" in completed.stdout + completed.stderr
    assert "Traceback" not in completed.stdout + completed.stderr


def test_an_unknown_side_is_one_line_and_status_2(ratings_file: Path):
    completed = _quality("--data", str(ratings_file), "--sides", "explicit/als,svd")
    assert completed.returncode == 2
    assert "--sides: unknown svd" in completed.stdout + completed.stderr
