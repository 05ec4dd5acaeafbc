"""``mf-dist recommend`` on a published run: seen items from its work directory, --users, --keep-seen."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from mf_dist import cli
from mf_dist.commands import recommend as recommend_command
from mf_dist.errors import ConfigError
from mf_dist.storage.reader import read_published
from tests.support.recommend import brute_force_recommendations, publish_user_item_run

runner = CliRunner()


@pytest.fixture
def run(client, tmp_path, monkeypatch):
    """An implicit run (9 users × 11 items, string user ids) with its ingest in <out>/_work, the default."""
    monkeypatch.setattr(recommend_command, "console", Console(width=250, force_terminal=False))
    rng = np.random.default_rng(8)
    ratings = pd.DataFrame(
        [(user, int(item), 1.0) for user in range(9) for item in rng.choice(11, size=3, replace=False)],
        columns=["user", "item", "rating"],
    )
    return publish_user_item_run(
        client,
        tmp_path / "out",
        tmp_path / "out" / "_work",
        [f"u{i}" for i in range(9)],
        list(range(200, 211)),
        rng.normal(size=(9, 3)),
        rng.normal(size=(11, 3)),
        ratings,
        block_size=4,
    )


def invoke(*args: str):
    result = runner.invoke(cli.app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_recommend_reads_seen_items_from_the_runs_work_dir(client, run, tmp_path):
    result = invoke(
        "recommend", str(tmp_path / "out"), "-n", "4", "--scheduler", client.scheduler.address, "-q"
    )

    assert result.exit_code == 0, result.output
    assert "9 users × top 4" in result.output and "seen liked" in result.output
    table, manifest, _ = read_published(tmp_path / "out", "recommendations")
    expected = brute_force_recommendations(run, 4, seen=run.ratings)
    assert table.to_pandas()[["user_id", "item_id"]].equals(expected[["user_id", "item_id"]])
    assert manifest["source"]["work_dir"] == str(run.work_dir / "ingest")


def test_recommend_for_given_users_keeping_seen_items(client, run, tmp_path):
    (tmp_path / "users.txt").write_text("u3\nu7\nnobody\n")
    result = invoke(
        "recommend",
        str(tmp_path / "out"),
        "-n",
        "2",
        "--users",
        str(tmp_path / "users.txt"),
        "--keep-seen",
        "--scheduler",
        client.scheduler.address,
        "-q",
    )

    assert result.exit_code == 0, result.output
    table, manifest, _ = read_published(tmp_path / "out", "recommendations")
    expected = brute_force_recommendations(run, 2, seen=None)
    expected = expected[expected.user_id.isin(["u3", "u7"])].reset_index(drop=True)
    assert table.to_pandas()[["user_id", "item_id"]].equals(expected[["user_id", "item_id"]])
    assert manifest["seen"] == "kept" and manifest["users_unknown"] == 1


def test_recommend_without_the_work_dir_asks_for_keep_seen(client, run, tmp_path):
    with pytest.raises(ConfigError, match="--keep-seen"):
        invoke(
            "recommend",
            str(tmp_path / "out"),
            "--work-dir",
            str(tmp_path / "gone"),
            "--scheduler",
            client.scheduler.address,
            "-q",
        )


def _training_ratings(run, path, user_column="user_id") -> None:
    """The run's training ratings as a user would have them: original ids, the run's input columns."""
    frame = pd.DataFrame(
        {
            user_column: [run.user_ids[u] for u in run.ratings.user],
            "item_id": [run.item_ids[i] for i in run.ratings.item],
            "rating": run.ratings.rating.to_numpy(np.float32),
        }
    )
    path.mkdir()
    half = len(frame) // 2
    frame.iloc[:half].to_parquet(path / "part-0.parquet")
    frame.iloc[half:].to_parquet(path / "part-1.parquet")


def test_recommend_reads_seen_items_from_the_training_ratings_without_the_work_dir(client, run, tmp_path):
    import shutil

    shutil.rmtree(run.work_dir)
    _training_ratings(run, tmp_path / "training")
    result = invoke(
        "recommend",
        str(tmp_path / "out"),
        "-n",
        "4",
        "--input",
        str(tmp_path / "training"),
        "--scheduler",
        client.scheduler.address,
        "-q",
    )

    assert result.exit_code == 0, result.output
    table, manifest, _ = read_published(tmp_path / "out", "recommendations")
    expected = brute_force_recommendations(run, 4, seen=run.ratings)
    assert table.to_pandas()[["user_id", "item_id"]].equals(expected[["user_id", "item_id"]])
    assert manifest["seen"] == "liked" and manifest["source"]["seen_ratings"] == "given"


def test_recommend_input_without_the_runs_columns_is_one_line_error(
    client, run, tmp_path, monkeypatch, capsys
):
    import sys

    _training_ratings(run, tmp_path / "training", user_column="customer")
    argv = ["mf-dist", "recommend", str(tmp_path / "out"), "--input", str(tmp_path / "training")]
    monkeypatch.setattr(sys, "argv", [*argv, "--scheduler", client.scheduler.address, "-q"])
    monkeypatch.setattr(cli, "errors", Console(stderr=True, width=500))
    with pytest.raises(SystemExit) as exit_status:
        cli.main()
    assert exit_status.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "part-0.parquet, column 'user_id': no such column among customer, item_id, rating" in lines[0]
