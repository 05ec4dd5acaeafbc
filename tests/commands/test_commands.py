"""``mf-dist neighbors / inspect / similar``, the terminal loss chart and the progress bars."""

from __future__ import annotations

import io
import json
import logging
import re
import sys

import numpy as np
import pytest
from prefect.logging.handlers import PrefectConsoleHandler
from rich.console import Console
from rich.progress import Progress
from typer.testing import CliRunner

from mf_dist import cli
from mf_dist.commands import inspect as inspect_commands
from mf_dist.commands import neighbors as neighbors_command
from mf_dist.flows.run_progress import PipelineProgressHandler, pipeline_progress
from mf_dist.storage.factor_files import EpochRecord
from mf_dist.storage.reader import read_published
from mf_dist.terminal.progress import count_progress
from mf_dist.terminal.text_chart import text_chart
from tests.support.published import HISTORY, publish_items

runner = CliRunner()


@pytest.fixture
def wide_consoles(monkeypatch):
    """Consoles wide enough that paths and ids are not wrapped inside panels."""
    for module in (inspect_commands, neighbors_command):
        monkeypatch.setattr(module, "console", Console(width=250, force_terminal=False))


@pytest.fixture
def published(client, tmp_path):
    """items (int ids, 12 × 3) and, computed through the CLI, its neighbors."""
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(12, 3)).astype(np.float32)
    ids = list(range(100, 112))
    items = publish_items(client, tmp_path, ids, vectors)
    return tmp_path, ids, vectors, items.run_id


def invoke(*args: str):
    result = runner.invoke(cli.app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_neighbors_command_publishes_and_similar_prints_them(client, published, wide_consoles):
    output, ids, vectors, _ = published
    result = invoke(
        "neighbors", str(output), "-k", "3", "--scheduler", client.scheduler.address, "--block-size", "5"
    )
    assert result.exit_code == 0, result.output
    assert "12 items × 3 (cosine" in result.output
    table, manifest, _ = read_published(output, "neighbors")
    assert manifest["k"] == 3 and table.num_rows == 36

    normalised = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = normalised @ normalised.T
    np.fill_diagonal(scores, -np.inf)
    best = ids[int(np.argmax(scores[0]))]
    shown = invoke("similar", str(output), "100", "--top", "2")
    assert shown.exit_code == 0, shown.output
    rows = re.findall(r"│\s*(\d+)\s*│\s*(\S+)\s*│\s*([-\d.]+)\s*│", shown.output)
    assert [int(rank) for rank, _, _ in rows] == [1, 2], "--top 2"
    assert rows[0][1] == str(best) and rows[0][2] == f"{scores[0].max():.4f}"


def test_inspect_summarises_every_table_with_a_loss_chart(client, published, wide_consoles):
    output, _, _, run_id = published
    invoke("neighbors", str(output), "-k", "2", "--scheduler", client.scheduler.address, "--quiet")
    result = invoke("inspect", str(output))
    assert result.exit_code == 0, result.output
    text = result.output
    assert f"items · run {run_id} (current)" in text
    assert "cooccurrence, rank 3" in text and "12 in 1 file(s)" in text
    assert f"final loss  {HISTORY[-1].loss:.6g}" in text
    assert "_loss_curve.png" in text and "┤█" in text
    assert "neighbors · run" in text and "top 2 by cosine per item" in text
    assert text.index("items · run") < text.index("neighbors · run")

    one_run = invoke("inspect", str(output / "items" / "runs" / run_id))
    assert one_run.exit_code == 0 and "neighbors" not in one_run.output


def test_inspect_reports_the_training_time_of_cumulative_seconds(client, tmp_path, wide_consoles):
    # loss_history[].seconds counts from the start of training (docs/tables.md):
    # these five records describe 9.6 s of training, not their sum (16.8 s).
    marks = [0.2, 1.1, 2.4, 3.5, 9.6]
    history = [
        EpochRecord(epoch=epoch, loss=10.0 - epoch, seconds=seconds) for epoch, seconds in enumerate(marks)
    ]
    publish_items(client, tmp_path, [1, 2, 3], np.eye(3, dtype=np.float32), history=history)
    result = invoke("inspect", str(tmp_path / "items"))
    assert result.exit_code == 0, result.output
    assert re.search(r"training\s+5 epochs \(0\.\.4\), 9\.6 s\b", result.output), result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["similar", "{output}", "999"], "error: item '999' is not in"),
        (["similar", "{output}", "abc"], "error: item ids of this table are integers"),
        (["inspect", "{output}/nowhere"], "error: {output}/nowhere: no such directory"),
        (["neighbors", "{output}/nowhere", "--scheduler", "{scheduler}"], "error: {output}/nowhere: no such"),
    ],
)
def test_errors_are_one_line_with_exit_status_2(client, published, monkeypatch, capsys, args, message):
    output = published[0]
    invoke("neighbors", str(output), "--scheduler", client.scheduler.address, "--quiet")
    values = {"output": str(output), "scheduler": client.scheduler.address}
    monkeypatch.setattr(sys, "argv", ["mf-dist", *(arg.format(**values) for arg in args)])
    monkeypatch.setattr(cli, "errors", Console(stderr=True, width=500))
    with pytest.raises(SystemExit) as exit_status:
        cli.main()
    assert exit_status.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(**values)), lines


def _shown(result) -> list[tuple[str, float]]:
    rows = re.findall(r"│\s*(\d+)\s*│\s*(\S+)\s*│\s*([-\d.]+)\s*│", result.output)
    assert [int(rank) for rank, _, _ in rows] == list(range(1, len(rows) + 1))
    return [(item, float(score)) for _, item, score in rows]


def test_similar_without_neighbors_or_index_is_exact_cosine_over_the_items(published, wide_consoles):
    output, ids, vectors, run_id = published
    normalised = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = normalised @ normalised[3]
    scores[3] = -np.inf
    expected = np.argsort(-scores, kind="stable")[:4]
    for path in (output, output / "items"):
        result = invoke("similar", str(path), str(ids[3]), "--top", "4")
        assert result.exit_code == 0, result.output
        assert f"cosine, exact over the items (items run {run_id})" in result.output
        shown = _shown(result)
        assert [item for item, _ in shown] == [str(ids[row]) for row in expected]
        np.testing.assert_allclose([score for _, score in shown], scores[expected], atol=1e-4)


def test_similar_asked_for_a_missing_neighbors_table_says_how_to_make_one(published, monkeypatch, capsys):
    output = published[0]
    monkeypatch.setattr(
        sys, "argv", ["mf-dist", "similar", str(output / "items"), "100", "--source", "neighbors"]
    )
    monkeypatch.setattr(cli, "errors", Console(stderr=True, width=500))
    with pytest.raises(SystemExit):
        cli.main()
    assert f"compute it with: mf-dist neighbors {output}" in capsys.readouterr().err


@pytest.mark.parametrize(("kind", "module"), [("faiss", "faiss"), ("hnsw", "hnswlib")])
def test_similar_uses_the_ann_index_before_the_neighbors_table(
    client, published, wide_consoles, kind, module
):
    """The index answers by inner product (exact at 12 items); --source picks another; stale: skipped."""
    pytest.importorskip(module)
    from mf_dist.stages.ann import build_ann

    output, ids, vectors, _ = published
    invoke("neighbors", str(output), "-k", "3", "--scheduler", client.scheduler.address, "--quiet")
    built = build_ann(client, output, kind)
    dots = vectors @ vectors[5]
    dots[5] = -np.inf
    expected = np.argsort(-dots, kind="stable")[:5]

    result = invoke("similar", str(output), str(ids[5]), "--top", "5")
    assert result.exit_code == 0, result.output
    assert f"inner product, approximate (ann run {built.run_id}, {kind})" in result.output
    shown = _shown(result)
    assert [item for item, _ in shown] == [str(ids[row]) for row in expected]
    np.testing.assert_allclose([score for _, score in shown], dots[expected], atol=1e-4)

    from_table = invoke("similar", str(output), str(ids[5]), "--source", "neighbors")
    assert "cosine (neighbors run" in from_table.output and len(_shown(from_table)) == 3
    exact = invoke("similar", str(output), str(ids[5]), "--source", "exact")
    assert "cosine, exact over the items" in exact.output

    # An index of another items run than the current one is not used.
    manifest_path = output / "ann" / "runs" / built.run_id / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["source"]["run_id"] = "another-run"
    manifest_path.write_text(json.dumps(manifest))
    stale = invoke("similar", str(output), str(ids[5]))
    assert "cosine (neighbors run" in stale.output


def test_text_chart_falls_with_the_loss():
    lines = text_chart(
        list(range(10)), [1000.0 / (epoch + 1) ** 2 for epoch in range(10)], width=40, height=5
    )
    assert len(lines) == 6
    bars = [line.split("┤")[1] for line in lines[:-1]]
    column_heights = [sum(row[column] != " " for row in bars) for column in range(len(bars[0]))]
    assert column_heights[0] == 5 and column_heights[-1] == 1
    assert column_heights == sorted(column_heights, reverse=True)
    assert lines[0].startswith("1e+03") and lines[-2].lstrip().startswith("10 ")
    assert "epoch 0" in lines[-1] and lines[-1].rstrip().endswith("9  (log scale)")
    assert text_chart([], []) == []


def test_progress_draws_only_on_a_terminal_and_not_when_quiet():
    terminal = io.StringIO()
    with count_progress(
        Console(file=terminal, force_terminal=True, width=120), "neighbours", "blocks", quiet=False
    ) as bar:
        assert bar is not None
        bar(3, 4)
    assert "3/4" in terminal.getvalue() and "blocks" in terminal.getvalue()

    with count_progress(Console(file=io.StringIO(), force_terminal=True), "x", "blocks", quiet=True) as bar:
        assert bar is None
    log = io.StringIO()
    with count_progress(Console(file=log, force_terminal=False), "x", "blocks", quiet=False) as bar:
        assert bar is None
    assert log.getvalue() == ""


def run_log_record(task_name: str | None, message: str, *args: object) -> logging.LogRecord:
    record = logging.LogRecord("prefect.task_runs", logging.INFO, __file__, 1, message, args, None)
    if task_name is not None:
        record.task_name = task_name
    return record


def test_pipeline_progress_follows_the_stage_and_epoch_records():
    progress = Progress(console=Console(file=io.StringIO()))
    stage, epochs = progress.add_task("starting", total=None), progress.add_task("epochs", total=5)
    handler = PipelineProgressHandler(progress, stage, epochs)
    handler.emit(run_log_record("ingest", "ingest: %.1f s", 1.0))
    assert progress.tasks[stage].description == "stage ingest"
    handler.emit(run_log_record("train", "epoch %d: loss %.6g %s", 3, 0.5, ""))
    assert progress.tasks[stage].description == "stage train" and progress.tasks[epochs].completed == 3
    # Records it does not know change nothing.
    handler.emit(run_log_record("export", "epoch %d", 9))
    handler.emit(run_log_record(None, "Finished in state Completed()"))
    assert progress.tasks[epochs].completed == 3 and progress.tasks[stage].description == "stage export"


def test_quiet_holds_back_prefect_info_lines_and_restores_them():
    import prefect.main  # noqa: F401  (installs Prefect's console handler, as running a flow does)

    handlers = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    assert handlers, "Prefect's console handler is installed once flows are imported"
    before = [h.level for h in handlers]
    with pipeline_progress(Console(file=io.StringIO()), epochs=3, quiet=True):
        assert all(h.level == logging.WARNING for h in handlers)
    assert [h.level for h in handlers] == before
