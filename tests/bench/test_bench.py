"""``mf-dist bench``: the command runs each suite whose reference is installed, and its parts are right."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from mf_dist.bench.data import MANY_ITEMS, ratings_dir
from mf_dist.bench.scales import DATA_SEED, LIKE_THRESHOLD, RATING_INTERCEPT, SCALES, SUITE_NAMES
from mf_dist.bench.suites import (
    EMBEDDING_LARGE,
    SUITES,
    embedding_reference_unavailable,
    relative_frobenius_error,
)
from mf_dist.bench.synthetic import GENERATOR_VERSION, synthetic_ratings
from mf_dist.runtime.cluster import visible_gpu_count
from tests.support.paths import REPO


def _bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mf_dist.cli", "bench", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env={"PYTHONPATH": str(REPO), **__import__("os").environ},
    )


def _available(suite: str) -> bool:
    chosen = SUITES[suite]
    return chosen.reference_unavailable() is None and chosen.ours_unavailable() is None


# Every suite runs both sides as child processes with their own clusters
# (half a minute each on 2 cores): the slow tier. The default run keeps the
# command's own checks below.
@pytest.mark.parametrize(
    "suite",
    [
        pytest.param("cooccurrence", marks=pytest.mark.slow),
        pytest.param("cooccurrence-embedding", marks=pytest.mark.slow),
        pytest.param(
            "nmf",
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(not _available("nmf"), reason="nmf reference or trainer missing"),
            ],
        ),
        pytest.param(
            "implicit-als",
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(not _available("implicit-als"), reason="implicit is not installed"),
            ],
        ),
    ],
)
def test_bench_suite_runs_both_sides_and_writes_json(suite, tmp_path):
    out = tmp_path / "out.json"
    completed = _bench(
        suite, "--scale", "tiny", "--json", str(out), "--cache-dir", str(tmp_path), cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    report = json.loads(out.read_text())
    # One row per variant, every variant run.
    assert len(report["suites"]) == len(SUITES[suite].variants), report
    for result in report["suites"]:
        assert result["failed"] is None, result
        sides = ("ours", "reference")
        if suite == "cooccurrence-embedding" and "items=" in result["suite"]:
            # The M = 100,000 variant (a few thousand items at tiny): ours runs, the dense
            # reference is reported as not run, with its memory arithmetic as the reason.
            assert result["reference"] is None
            assert "80 GB at M = 100,000" in result["unavailable"]
            assert "8 GB" in result["target"]
            details = result["ours"]["details"]
            assert details["items"] == MANY_ITEMS["tiny"].n_liked_items
            assert details["rank"] == EMBEDDING_LARGE["rank"]
            assert details["nnz_offdiagonal"] > 0
            sides = ("ours",)
        else:
            assert result["unavailable"] is None, result
        for side in sides:
            measured = result[side]
            assert measured is not None, (suite, side)
            assert math.isfinite(measured["seconds"]) and measured["seconds"] > 0
            assert math.isfinite(measured["quality"])
            assert measured["peak_process_bytes"] > 0
            assert measured["peak_total_bytes"] >= measured["peak_process_bytes"]
        if suite == "cooccurrence":
            # Both sides compute the same X exactly.
            assert result["ours"]["quality"] == pytest.approx(result["reference"]["quality"], rel=1e-12)
            assert (
                result["ours"]["details"]["nnz_offdiagonal"]
                == result["reference"]["details"]["nnz_offdiagonal"]
            )
    assert suite in completed.stdout


def test_unknown_suite_is_one_line_error(tmp_path):
    completed = _bench("no-such-suite", "--scale", "tiny", cwd=tmp_path)
    assert completed.returncode == 2
    assert "unknown bench suite 'no-such-suite'" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.skipif(visible_gpu_count() > 0, reason="a GPU is visible here")
def test_cuda_without_gpu_is_a_clear_error(tmp_path):
    completed = _bench("cooccurrence", "--scale", "tiny", "--device", "cuda", cwd=tmp_path)
    assert completed.returncode == 2
    assert "no GPU is visible" in completed.stderr


def test_ml20m_scale_has_the_movielens_shape():
    ml20m = SCALES["ml20m"]
    assert (ml20m.n_users, ml20m.n_items, ml20m.n_ratings) == (138_493, 26_744, 20_000_263)


def test_tiny_scale_data_is_fixed_and_well_formed(tmp_path):
    """The bench's own files: the generator at the bench's seed and intercept, the same every time."""
    tiny = SCALES["tiny"]
    directory = ratings_dir(tmp_path / "one", tiny)
    assert directory.name == f"ratings-seed{DATA_SEED}-mu{RATING_INTERCEPT:g}-g{GENERATOR_VERSION}"
    first = pd.read_parquet(directory).reset_index(drop=True)
    again = pd.read_parquet(ratings_dir(tmp_path / "two", tiny)).reset_index(drop=True)
    assert first.equals(again)
    expected = synthetic_ratings(
        tiny.n_ratings, n_users=tiny.n_users, n_items=tiny.n_items, intercept=RATING_INTERCEPT, seed=DATA_SEED
    )
    assert (
        first.sort_values(["user_id", "item_id"])
        .reset_index(drop=True)
        .equals(expected.sort_values(["user_id", "item_id"]).reset_index(drop=True))
    )
    assert len(first) == tiny.n_ratings
    assert not first.duplicated(["user_id", "item_id"]).any()
    assert set(np.unique(first["rating"] * 2)) <= set(range(1, 11))
    assert first.groupby("user_id").size().min() >= 20


def test_the_like_share_matches_the_issue_set_at_ml20m_item_count():
    """About 35.5 % of ratings are likes (7.1 M of 20 M): checked on a 300 K sample with ML-20M's items."""
    sample = synthetic_ratings(
        300_000, n_users=2_077, n_items=SCALES["ml20m"].n_items, intercept=RATING_INTERCEPT, seed=DATA_SEED
    )
    assert 0.33 < float((sample["rating"] >= LIKE_THRESHOLD).mean()) < 0.38


def test_large_embedding_variant_is_the_issue_size():
    assert EMBEDDING_LARGE == {"items": 100_000, "rank": 128}
    for scale in ("small", "ml20m"):
        assert MANY_ITEMS[scale].n_liked_items == 100_000
    assert embedding_reference_unavailable({}) is None
    assert "80 GB" in embedding_reference_unavailable(EMBEDDING_LARGE)


def test_tiny_many_items_data_has_enough_liked_items():
    shape = MANY_ITEMS["tiny"]
    frame = synthetic_ratings(
        shape.n_ratings, n_users=shape.n_users, n_items=shape.n_item_ids, seed=DATA_SEED
    )
    liked_items = frame.loc[frame["rating"] >= LIKE_THRESHOLD, "item_id"].nunique()
    assert liked_items >= shape.n_liked_items


def test_relative_frobenius_error_matches_dense():
    rng = np.random.default_rng(0)
    x = sp.random(60, 50, density=0.2, random_state=1, format="csr") * 10
    w, h = rng.random((60, 4)), rng.random((50, 4))
    dense = np.linalg.norm(x.toarray() - w @ h.T) / np.linalg.norm(x.toarray())
    assert relative_frobenius_error(x.tocsr(), w, h) == pytest.approx(dense, rel=1e-10)


def test_the_cli_knows_every_suite_without_importing_them():
    """``SUITE_NAMES`` (what ``mf-dist bench --help`` and its check read) names exactly the suites."""
    assert tuple(SUITES) == SUITE_NAMES


def test_the_cli_starts_without_torch_or_dask():
    """``mf-dist --help`` and every error before a run must not wait for torch and Dask to import."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, mf_dist.cli; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for heavy in ("'torch'", "'distributed'", "'dask.dataframe'", "'scipy.sparse'", "'matplotlib'"):
        assert heavy not in loaded, heavy
