"""Killed ``mf-dist run`` processes and concurrent runs: the published tables stay whole.

The processes are real: ``mf-dist run`` (or the same command with a kill
point, :mod:`tests.reliability.killed_export`) in a session of its own,
talking to this session's Prefect server and Dask cluster, ended with
``SIGKILL``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mf_dist import read_embeddings
from mf_dist.config import load_config
from mf_dist.errors import OutputError
from mf_dist.flows.pipeline import factorization_pipeline
from mf_dist.storage.output_lock import LOCK_FILE
from tests.support.paths import REPO
from tests.support.runs import cli, latest_runs, mf_dist_process, run_flags, table_files


def wait_for(
    condition: Callable[[], bool], process: subprocess.Popen, log: Path, what: str, timeout: float = 300
) -> None:
    """Poll ``condition`` while ``process`` runs; fail with its log if it ends or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"{what}: the process ended first (status {process.returncode}):\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s\n{log.read_text()}")
        time.sleep(0.05)


def finish(process: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    """Wait for ``process``; its output."""
    process.wait(timeout=timeout)
    return log.read_text(errors="replace")


def lock_holder(directory: Path) -> dict:
    try:
        return json.loads((directory / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return {}


def debris(output: Path) -> list[Path]:
    return sorted([*output.glob("*/runs/.*.partial"), *output.glob("*/.LATEST.*.tmp")])


@pytest.mark.slow
@pytest.mark.parametrize("point", ["parts-written", "before-latest"])
def test_a_process_killed_while_exporting_leaves_the_previous_run_current(
    client, prefect_api, published_source, output_copy, point
):
    before = table_files(output_copy)
    previous = latest_runs(output_copy)
    flags = run_flags(published_source, output_copy, client.scheduler.address, "--model", "explicit")
    log = output_copy.parent / "killed.log"
    process = mf_dist_process([point, *flags], prefect_api, log, module="tests.reliability.killed_export")
    text = finish(process, log)
    assert process.returncode == -signal.SIGKILL, text

    # Readers that follow LATEST still get the previous run, whole.
    assert latest_runs(output_copy) == previous
    now = table_files(output_copy)
    assert {name: digest for name, digest in now.items() if name in before} == before
    for table, run_id in previous.items():
        embeddings = read_embeddings(output_copy / table)
        assert embeddings.manifest["run_id"] == run_id
        assert len(embeddings.ids) == embeddings.manifest["row_count"]
    # What the killed run left is where no reader looks.
    new_files = sorted(set(now) - set(before))
    assert new_files
    if point == "parts-written":
        assert debris(output_copy)
        assert all("/runs/." in name and ".partial/" in name for name in new_files), new_files
        assert not any(name.endswith("_manifest.json") for name in new_files)
    else:
        assert not debris(output_copy)
        assert {Path(name).parts[0] for name in new_files if name.endswith("_manifest.json")} == set(previous)

    # The next run takes the lock the dead process held, clears its debris and publishes.
    assert (
        cli(*run_flags(published_source, output_copy, client.scheduler.address, "--model", "explicit"))
        is None
    )
    current = latest_runs(output_copy)
    assert set(current) == set(previous) and not set(current.values()) & set(previous.values())
    assert not debris(output_copy)
    # The runs published before are kept as they were.
    kept = {name: digest for name, digest in before.items() if not name.endswith("LATEST")}
    assert {name: digest for name, digest in table_files(output_copy).items() if name in kept} == kept
    for table in current:
        assert read_embeddings(output_copy / table).manifest["run_id"] == current[table]


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_from_its_last_checkpoint(
    client, prefect_api, published_source, tmp_path
):
    settings = ["--model", "cooccurrence", "--epochs", "12", "--tolerance", "0", "--seed", "11"]
    settings += ["--block-size", "100"]  # 3 item blocks: epochs of a few dozen tasks
    output = tmp_path / "out"
    flags = run_flags(published_source, output, client.scheduler.address, *settings)
    checkpoints = output / "_work" / "checkpoints" / "cooccurrence"
    log = tmp_path / "killed.log"
    process = mf_dist_process(flags, prefect_api, log)
    try:
        # Two runs on one output at once: the second is refused, naming the first.
        wait_for(lambda: lock_holder(output).get("purpose", "").startswith("run "), process, log, "the lock")
        error = cli(*flags)
        assert isinstance(error, OutputError), error
        assert f"in use by another mf-dist run (pid {process.pid} on " in str(error)
        wait_for(
            lambda: (checkpoints / "epoch-00001" / "checkpoint.json").exists(), process, log, "a checkpoint"
        )
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (output / "items" / "LATEST").exists(), "the run finished before it could be killed"
    last = max(checkpoints.glob("epoch-*/checkpoint.json"))
    checkpoint = json.loads(last.read_text())
    assert 1 <= checkpoint["epoch"] < 12

    resumed_log = tmp_path / "resumed.log"
    resumed = mf_dist_process([*flags, "--resume"], prefect_api, resumed_log)
    text = finish(resumed, resumed_log)
    assert resumed.returncode == 0, text
    assert (
        cli(*run_flags(published_source, tmp_path / "undisturbed", client.scheduler.address, *settings))
        is None
    )

    table = read_embeddings(output / "items")
    reference = read_embeddings(tmp_path / "undisturbed" / "items")
    history = table.manifest["loss_history"]
    # The epochs before the kill come from the checkpoint (their wall times too): it continued.
    assert history[: len(checkpoint["history"])] == checkpoint["history"]
    np.testing.assert_allclose(
        [r["loss"] for r in history], [r["loss"] for r in reference.manifest["loss_history"]], rtol=1e-6
    )
    np.testing.assert_array_equal(table.ids, reference.ids)
    np.testing.assert_allclose(table.vectors, reference.vectors, rtol=1e-5, atol=1e-6)


HOLD_LOCK = """
import sys, time
from mf_dist.storage.output_lock import exclusive_run
with exclusive_run(sys.argv[1], sys.argv[2], purpose="a test holding it"):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_gone(
    client, prefect_api, published_source, output_copy, tmp_path
):
    shared_work = tmp_path / "shared-work"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(output_copy), str(shared_work)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = table_files(output_copy)
        scheduler = client.scheduler.address
        refused = f"is in use by another mf-dist run \\(pid {holder.pid} on .*, a test holding it\\)"

        # The same output: from the command line, and from the flow a deployment runs.
        error = cli(*run_flags(published_source, output_copy, scheduler, "--model", "explicit"))
        assert isinstance(error, OutputError) and re.search(
            f"{re.escape(str(output_copy))} {refused}", str(error)
        ), error
        with pytest.raises(OutputError, match=refused):
            factorization_pipeline(
                load_config(None, input=str(published_source), output=str(output_copy), scheduler=scheduler)
            )
        # Another output, but the same work directory.
        error = cli(*run_flags(published_source, tmp_path / "other", scheduler, "--work-dir", shared_work))
        assert isinstance(error, OutputError) and re.search(
            f"{re.escape(str(shared_work))} {refused}", str(error)
        ), error
        assert table_files(output_copy) == before
    finally:
        holder.kill()  # SIGKILL: the holder gets no chance to clean up
        holder.wait()

    previous = latest_runs(output_copy)
    assert cli(*run_flags(published_source, output_copy, scheduler, "--model", "explicit")) is None
    assert latest_runs(output_copy) != previous
    for table, run_id in latest_runs(output_copy).items():
        run = output_copy / table / "runs" / run_id
        assert pq.read_table(run).num_rows == read_embeddings(run).manifest["row_count"]
