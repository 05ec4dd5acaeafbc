"""The derived tables (neighbors, recommendations, ann) and the commands on published output, on S3.

A real S3 API (moto's server on loopback) and a real cluster, as in
``test_object_store.py``: one run with ``--neighbors --recommend --ann`` whose
input, work directory and output are all on the store is compared with the
same run on local disk, and the commands that read or publish runs
(``similar``, ``inspect``, ``neighbors``, ``ann``, ``recommend``, ``fold-in``)
are pointed at the store. Nothing of ours is mocked. Slow tier (two pipeline
runs); the quick ones are in ``test_object_store_commands.py``.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from mf_dist import cli, read_embeddings
from mf_dist.commands import ann as ann_command
from mf_dist.commands import fold_in as fold_in_command
from mf_dist.commands import inspect as inspect_commands
from mf_dist.commands import neighbors as neighbors_command
from mf_dist.commands import recommend as recommend_command
from mf_dist.config import load_config
from mf_dist.flows.pipeline import factorization_pipeline
from mf_dist.storage.filesystems import resolve
from mf_dist.storage.reader import read_manifest, read_published, resolve_remote_run
from mf_dist.storage.store import read_table
from tests.support.data import write_input
from tests.support.object_store import bucket_with_ratings

pytest.importorskip("s3fs")
pytest.importorskip("moto")
pytest.importorskip("hnswlib")

# Two pipeline runs (local and on the store) of about 10 s each on a 2-core machine.
pytestmark = pytest.mark.slow

BUCKET = "derived-bucket"
SETTINGS = {
    "model": "explicit",
    "rank": 4,
    "epochs": 3,
    "block_size": 100,
    "seed": 3,
    "neighbors": 5,
    "recommend": 5,
    "ann": "hnsw",
}
DERIVED = ("neighbors", "recommendations", "ann")
runner = CliRunner()


@pytest.fixture(scope="module")
def runs(prefect_server, client, tiny_ratings, tmp_path_factory):
    """The same run published locally and on the store: (local summary, local output, store summary, URL)."""
    scratch = tmp_path_factory.mktemp("derived")
    with bucket_with_ratings(client, tiny_ratings, scratch, BUCKET):
        common = {"scheduler": client.scheduler.address, **SETTINGS}
        local_output = scratch / "out"
        local = factorization_pipeline(
            load_config(
                None,
                input=str(write_input(tiny_ratings, scratch / "local-input")),
                output=str(local_output),
                work_dir=str(scratch / "work"),
                **common,
            )
        )
        output = f"s3://{BUCKET}/out"
        remote = factorization_pipeline(
            load_config(
                None,
                input=f"s3://{BUCKET}/ratings/",
                output=output,
                work_dir=f"s3://{BUCKET}/work",
                **common,
            )
        )
        yield local, local_output, remote, output


@pytest.fixture
def wide_consoles(monkeypatch):
    """Consoles wide enough that URLs and ids are not wrapped."""
    for module in (inspect_commands, neighbors_command, ann_command, recommend_command, fold_in_command):
        monkeypatch.setattr(module, "console", Console(width=400, force_terminal=False))


def invoke(*args: str):
    result = runner.invoke(cli.app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def shown_rows(output: str) -> list[tuple[str, str]]:
    """(item id, score) of each row of ``mf-dist similar``'s table."""
    return [
        (item, score) for _, item, score in re.findall(r"│\s*(\d+)\s*│\s*(\S+)\s*│\s*([-\d.]+)\s*│", output)
    ]


def test_a_run_with_derived_tables_on_the_store_publishes_those_of_a_local_run(runs):
    local, local_output, remote, output = runs
    filesystem, root = resolve(output)
    for table in ("items", "users", *DERIVED):
        # Every table committed by LATEST to this run, each run with its manifest.
        assert filesystem.cat_file(f"{root}/{table}/LATEST").decode().strip() == remote.run_id, table
        assert filesystem.isfile(f"{root}/{table}/runs/{remote.run_id}/_manifest.json"), table
    assert remote.final_loss == pytest.approx(local.final_loss, rel=1e-6)
    for table in ("neighbors", "recommendations"):
        expected, expected_manifest, _ = read_published(local_output, table)
        rows, manifest, run_url = read_published(output, table)
        assert run_url == f"{output}/{table}/runs/{remote.run_id}"
        assert rows.equals(expected), table
        assert manifest["row_count"] == expected_manifest["row_count"] > 0
    # Seen items came from the ingest in the store's work directory.
    _, manifest, _ = read_published(output, "recommendations")
    assert manifest["seen"] == "rated" and manifest["source"]["work_dir"] == f"s3://{BUCKET}/work/ingest"
    # The index (built in a temporary directory) and its id file were uploaded beside the manifest.
    ann_run = f"{output}/ann/runs/{remote.run_id}"
    assert filesystem.size(f"{root}/ann/runs/{remote.run_id}/index.hnsw") > 1000
    local_ann = local_output / "ann" / "runs" / local.run_id
    manifest, expected = read_manifest(ann_run), read_manifest(local_ann)
    assert (manifest["items"], manifest["dim"], manifest["source"]["run_id"]) == (
        expected["items"],
        expected["dim"],
        remote.run_id,
    )
    assert read_table(f"{ann_run}/items.parquet").equals(read_table(local_ann / "items.parquet"))
    assert not filesystem.exists(f"{root}/.mf-dist.lock")


def test_similar_and_inspect_read_the_store(runs, wide_consoles):
    _, local_output, remote, output = runs
    item = str(read_embeddings(output, "items").ids[0])
    answers = {}
    for source in ("neighbors", "exact"):
        on_store = invoke("similar", output, item, "--top", "3", "--source", source).output
        on_disk = invoke("similar", str(local_output), item, "--top", "3", "--source", source).output
        assert len(shown_rows(on_store)) == 3 and shown_rows(on_store) == shown_rows(on_disk), source
        answers[source] = shown_rows(on_disk)
    # auto: the ANN index of the current items run, downloaded to be searched.
    by_index = invoke("similar", output, item, "--top", "3").output
    assert f"approximate (ann run {remote.run_id}, hnsw)" in by_index
    assert len(shown_rows(by_index)) == 3 and item not in [found for found, _ in shown_rows(by_index)]
    # The neighbors table named directly.
    named = invoke("similar", f"{output}/neighbors", item, "--top", "2").output
    assert f"cosine (neighbors run {remote.run_id})" in named
    assert shown_rows(named) == answers["neighbors"][:2]

    shown = invoke("inspect", output).output
    for table in ("items", "users", "neighbors"):
        assert f"{table} · run {remote.run_id} (current)" in shown, table
    assert "top 5 by cosine per item" in shown


def test_the_commands_publish_readable_runs_on_the_store(runs, client, tmp_path, tiny_ratings, wide_consoles):
    _, local_output, remote, output = runs
    # Copies, so that the runs these commands publish leave the fixture's outputs as they were.
    filesystem, root = resolve(output)
    filesystem.copy(root, f"{BUCKET}/commands", recursive=True)
    copy = f"s3://{BUCKET}/commands"
    local_copy = tmp_path / "commands"
    shutil.copytree(local_output, local_copy)
    scheduler = ("--scheduler", client.scheduler.address, "--quiet")

    result = invoke("neighbors", copy, "-k", "3", *scheduler)
    assert f"→ {copy}/neighbors/runs/" in result.output
    rows, manifest, run_url = read_published(copy, "neighbors")
    assert manifest["k"] == 3 and manifest["source"]["run_id"] == remote.run_id
    assert run_url != f"{copy}/neighbors/runs/{remote.run_id}"
    assert rows.num_rows == manifest["row_count"] == 3 * len(read_embeddings(copy))

    invoke("ann", copy, "--kind", "hnsw", "--scheduler", client.scheduler.address)
    ann_run = resolve_remote_run(f"{copy}/ann")
    assert ann_run != f"{copy}/ann/runs/{remote.run_id}"
    assert read_manifest(ann_run)["source"]["run_id"] == remote.run_id
    found = invoke("similar", copy, str(read_embeddings(copy).ids[1]), "--source", "ann").output
    assert f"(ann run {ann_run.rsplit('/', 1)[-1]}, hnsw)" in found and len(shown_rows(found)) > 0

    # Seen items from the run's own work directory on the store (its config's work_dir).
    invoke("recommend", copy, "-n", "5", *scheduler)
    rows, manifest, _ = read_published(copy, "recommendations")
    expected, _, _ = read_published(local_output, "recommendations")
    assert manifest["run_id"] != remote.run_id and rows.equals(expected)

    # Fold-in: one known user with new ratings, one new user; the same on disk and on the store.
    items = sorted(tiny_ratings["item_id"].unique())[:4]
    known_user = int(tiny_ratings["user_id"].iloc[0])
    new_user = int(tiny_ratings["user_id"].max()) + 1
    frame = pd.DataFrame(
        {
            "user_id": [known_user] * 2 + [new_user] * 3,
            "item_id": [items[0], items[1], items[1], items[2], items[3]],
            "rating": [5.0, 1.0, 4.0, 3.0, 2.0],
        }
    ).astype({"user_id": tiny_ratings["user_id"].dtype, "item_id": tiny_ratings["item_id"].dtype})
    new_ratings = tmp_path / "new.parquet"
    frame.to_parquet(new_ratings)
    for target in (copy, str(local_copy)):
        invoke("fold-in", target, "--input", str(new_ratings), "--recommend", "3", *scheduler[:2])
    folded, on_disk = read_embeddings(copy, "users"), read_embeddings(local_copy, "users")
    assert (
        folded.manifest["fold_in"]["users_added"] == 1 and folded.manifest["fold_in"]["users_replaced"] == 1
    )
    assert folded.manifest["fold_in"]["base_run_id"] == remote.run_id
    assert np.array_equal(folded.ids, on_disk.ids) and np.array_equal(folded.vectors, on_disk.vectors)
    rows, manifest, _ = read_published(copy, "recommendations")
    assert manifest["users"] == 2 and manifest["source"]["run_id"] == folded.manifest["run_id"]
    assert rows.equals(read_published(local_copy, "recommendations")[0])

    shown = invoke("inspect", copy).output
    assert f"users · run {folded.manifest['run_id']} (current)" in shown
    assert not filesystem.exists(f"{BUCKET}/commands/.mf-dist.lock")
