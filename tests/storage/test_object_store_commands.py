"""``neighbors``, ``ann``, ``similar`` and ``inspect`` on a table in an object store, and staged runs there.

A real S3 API (moto's server on loopback) and a real cluster; the items table
is published by the real export stage and uploaded as it is. Quick (no
training): the whole pipeline with the derived tables on the store is
``test_object_store_derived.py`` (slow tier).
"""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from mf_dist import cli
from mf_dist.commands import ann as ann_command
from mf_dist.commands import inspect as inspect_commands
from mf_dist.commands import neighbors as neighbors_command
from mf_dist.errors import OutputError
from mf_dist.storage.filesystems import resolve
from mf_dist.storage.output_lock import exclusive_object_store, remove_debris
from mf_dist.storage.publish import publish_run, staged_run, write_manifest
from mf_dist.storage.reader import read_manifest, read_published, resolve_remote_run
from mf_dist.storage.store import exists, join, read_bytes, write_bytes
from tests.support.object_store import s3_bucket
from tests.support.published import publish_items

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "commands-bucket"
runner = CliRunner()


@pytest.fixture(scope="module")
def store(client):
    with s3_bucket(client, BUCKET) as environment:
        yield environment


@pytest.fixture
def published(client, store, tmp_path):
    """One items table (40 × 4, with biases) on local disk and the same files on the store."""
    rng = np.random.default_rng(5)
    ids = list(range(100, 140))
    local = tmp_path / "local"
    publish_items(
        client,
        local,
        ids,
        rng.normal(size=(40, 4)).astype(np.float32),
        bias=rng.normal(size=40).astype(np.float32),
    )
    filesystem, _ = resolve(f"s3://{BUCKET}")
    filesystem.put(str(local / "items"), f"{BUCKET}/{tmp_path.name}/items", recursive=True)
    return local, f"s3://{BUCKET}/{tmp_path.name}"


@pytest.fixture
def wide_consoles(monkeypatch):
    """Consoles wide enough that URLs and ids are not wrapped."""
    for module in (inspect_commands, neighbors_command, ann_command):
        monkeypatch.setattr(module, "console", Console(width=400, force_terminal=False))


def invoke(*args: str):
    result = runner.invoke(cli.app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def shown_rows(output: str) -> list[tuple[str, str]]:
    """(item id, score) of each row of ``mf-dist similar``'s table."""
    rows = re.findall(r"│\s*(\d+)\s*│\s*(\S+)\s*│\s*([-\d.]+)\s*│", output)
    return [(item, score) for _, item, score in rows]


def test_neighbors_ann_similar_and_inspect_on_the_store(client, published, wide_consoles):
    local, output = published
    scheduler = ("--scheduler", client.scheduler.address)
    for target in (str(local), output):
        invoke("neighbors", target, "-k", "4", "--block-size", "16", "--quiet", *scheduler)
    on_store, manifest, run_url = read_published(output, "neighbors")
    assert run_url.startswith(f"{output}/neighbors/runs/") and manifest["source"]["path"].startswith(output)
    assert on_store.equals(read_published(local, "neighbors")[0]) and on_store.num_rows == 160

    for source in ("neighbors", "exact"):
        answers = [
            shown_rows(invoke("similar", target, "107", "--top", "3", "--source", source).output)
            for target in (str(local), output)
        ]
        assert len(answers[1]) == 3 and answers[0] == answers[1], source

    pytest.importorskip("hnswlib")
    invoke("ann", output, "--kind", "hnsw", *scheduler)
    ann_run = resolve_remote_run(f"{output}/ann")
    filesystem, root = resolve(ann_run)
    assert filesystem.size(f"{root}/index.hnsw") > 1000 and read_manifest(ann_run)["items"] == 40
    # auto: the index of the current items run, downloaded to a temporary file and searched.
    by_index = invoke("similar", output, "107", "--top", "3").output
    assert f"approximate (ann run {ann_run.rsplit('/', 1)[-1]}, hnsw)" in by_index
    assert len(shown_rows(by_index)) == 3 and "107" not in [item for item, _ in shown_rows(by_index)]

    shown = invoke("inspect", output).output
    assert "items · run" in shown and "neighbors · run" in shown and "(current)" in shown
    assert "top 4 by cosine per item" in shown and f"{output}/items/runs/" in shown
    assert not filesystem.exists(f"{BUCKET}/{output.rsplit('/', 1)[-1]}/.mf-dist.lock")


def test_a_command_is_refused_while_another_writer_holds_the_output(client, published, monkeypatch, capsys):
    _, output = published
    monkeypatch.setattr(
        sys, "argv", ["mf-dist", "neighbors", output, "--scheduler", client.scheduler.address]
    )
    monkeypatch.setattr(cli, "errors", Console(stderr=True, width=500))
    with exclusive_object_store(output, purpose="run A"), pytest.raises(SystemExit) as exit_status:
        cli.main()
    assert exit_status.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {output} is in use by another mf-dist run ("), (
        lines
    )
    assert "run A" in lines[0] and not exists(f"{output}/neighbors")


def test_a_staged_run_on_the_store_is_published_whole_or_not_at_all(store):
    table = f"s3://{BUCKET}/staged/neighbors"
    with staged_run(table, "run-1", "a test table") as run:
        assert run == f"{table}/runs/run-1"
        write_bytes(join(run, "part-00000.parquet"), b"rows")
        write_manifest(run, {"format_version": 1, "run_id": "run-1"})
    publish_run(table, "run-1")

    with pytest.raises(RuntimeError), staged_run(table, "run-2", "a test table") as run:
        write_bytes(join(run, "part-00000.parquet"), b"half")
        raise RuntimeError("killed while writing")
    # The failed run is gone and LATEST still names the first.
    assert not exists(f"{table}/runs/run-2")
    assert read_bytes(f"{table}/LATEST").decode().strip() == "run-1"
    # A run killed outright leaves parts without a manifest: debris for the next writer to remove.
    write_bytes(f"{table}/runs/run-3/part-00000.parquet", b"orphan")
    assert remove_debris(f"s3://{BUCKET}/staged") == [f"{table}/runs/run-3"]
    assert exists(f"{table}/runs/run-1/_manifest.json")
    # A published run is never written over.
    with (
        pytest.raises(OutputError, match="a published run of this id is there already"),
        staged_run(table, "run-1", "a test table"),
    ):
        pass
