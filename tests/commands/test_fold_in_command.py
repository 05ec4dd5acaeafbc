"""``mf-dist fold-in``: a new users run with given users replaced or added, then recommendations for it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from mf_dist import cli, fold_in, read_embeddings
from mf_dist.commands import fold_in as fold_in_command
from mf_dist.commands import recommend as recommend_command
from mf_dist.errors import ConfigError
from mf_dist.storage.reader import read_published
from tests.support.recommend import publish_user_item_run

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(cli.app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture
def run(client, tmp_path, monkeypatch):
    for module in (fold_in_command, recommend_command):
        monkeypatch.setattr(module, "console", Console(width=250, force_terminal=False))
    rng = np.random.default_rng(11)
    return publish_user_item_run(
        client,
        tmp_path / "out",
        tmp_path / "out" / "_work",
        [1, 2, 3, 4, 5, 6],
        list(range(50, 62)),
        rng.normal(size=(6, 3)),
        rng.normal(size=(12, 3)),
        pd.DataFrame({"user": [0, 1], "item": [0, 1], "rating": [4.0, 5.0]}),
        model="explicit",
        user_bias=rng.normal(size=6).astype(np.float32),
        item_bias=rng.normal(size=12).astype(np.float32),
        global_mean=3.0,
        hyperparameters={"regularization": 0.1},
        block_size=4,
    )


def test_fold_in_replaces_and_adds_users_and_recommend_reads_the_new_run(client, run, tmp_path):
    output = tmp_path / "out"
    new = pd.DataFrame(
        {
            "user_id": [3, 3, 100, 100, 100],
            "item_id": [50, 55, 51, 52, 999],
            "rating": [5.0, 1.0, 4.0, 2.0, 3.0],
        }
    )
    new.to_parquet(tmp_path / "new.parquet")

    result = invoke("fold-in", str(output), "--input", str(tmp_path / "new.parquet"))

    assert result.exit_code == 0, result.output
    assert "1 users replaced, 1 added (1 ratings of unknown items skipped)" in result.output
    users = read_embeddings(output, "users")
    expected = fold_in(output, new)
    assert users.ids.tolist() == [1, 2, 3, 4, 5, 6, 100]
    np.testing.assert_array_equal(users.vectors[[2, 6]], expected.vectors)
    np.testing.assert_array_equal(users.bias[[2, 6]], expected.bias)
    keep = [0, 1, 3, 4, 5]
    np.testing.assert_array_equal(users.vectors[keep], run.users[keep])
    np.testing.assert_array_equal(users.bias[keep], run.user_bias[keep])
    assert users.manifest["fold_in"]["base_run_id"] == run.export.run_id
    assert users.manifest["items_run_id"] == run.export.run_id != users.manifest["run_id"]

    with pytest.raises(ConfigError, match="is a fold-in"):
        invoke("recommend", str(output), "-n", "2", "--scheduler", client.scheduler.address, "-q")
    result = invoke(
        "recommend", str(output), "-n", "2", "--keep-seen", "--scheduler", client.scheduler.address, "-q"
    )
    assert result.exit_code == 0, result.output
    table, manifest, _ = read_published(output, "recommendations")
    assert manifest["source"]["run_id"] == users.manifest["run_id"]
    frame = table.to_pandas()
    scores = 3.0 + users.bias[:, None] + run.item_bias[None, :] + users.vectors @ run.items.T
    best = np.argsort(-scores, axis=1, kind="stable")[:, :2]
    assert frame.item_id.tolist() == np.asarray(run.item_ids)[best].reshape(-1).tolist()
    np.testing.assert_allclose(frame.score, np.take_along_axis(scores, best, 1).reshape(-1), atol=1e-5)


def test_fold_in_with_recommend_leaves_out_the_given_ratings(client, run, tmp_path):
    output = tmp_path / "out"
    new = pd.DataFrame(
        {"user_id": [2, 2, 2, 77], "item_id": [50, 51, 52, 53], "rating": [1.0, 2.0, 3.0, 4.0]}
    )
    new.to_parquet(tmp_path / "new.parquet")

    result = invoke(
        "fold-in",
        str(output),
        "--input",
        str(tmp_path / "new.parquet"),
        "--recommend",
        "3",
        "--scheduler",
        client.scheduler.address,
    )

    assert result.exit_code == 0, result.output
    assert "2 users × top 3" in result.output
    users = read_embeddings(output, "users")
    table, manifest, _ = read_published(output, "recommendations")
    assert manifest["seen"] == "rated" and manifest["source"]["seen_ratings"] == "given"
    assert manifest["source"]["run_id"] == users.manifest["run_id"]
    rows = {user: row for row, user in enumerate(users.ids)}
    position = {item: row for row, item in enumerate(run.item_ids)}
    scores = 3.0 + users.bias[:, None] + run.item_bias[None, :] + users.vectors @ run.items.T
    for user, item in zip(new.user_id, new.item_id, strict=True):
        scores[rows[user], position[item]] = -np.inf
    expected_rows = [rows[2], rows[77]]
    best = np.argsort(-scores[expected_rows], axis=1, kind="stable")[:, :3]
    frame = table.to_pandas()
    assert frame.user_id.tolist() == [2, 2, 2, 77, 77, 77]
    assert frame.item_id.tolist() == np.asarray(run.item_ids)[best].reshape(-1).tolist()
    np.testing.assert_allclose(
        frame.score, np.take_along_axis(scores[expected_rows], best, 1).reshape(-1), atol=1e-5
    )
