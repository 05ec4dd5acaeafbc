"""Observable, resumable flow runs: stage caching, retries and artifacts, on a real Prefect server.

The late failure is real: the export stage cannot create the items table's
directory because a regular file is in its place. Which stages ran and
which were taken from the cache is read back from the Prefect API.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.states import Failed

from mf_dist.config import RunConfig, load_config
from mf_dist.errors import InputError
from mf_dist.flows.pipeline import (
    OPERATIONAL_SETTINGS,
    cooccurrence_task,
    factorization_pipeline,
    ingest_task,
    is_transient,
    stage_options,
    train_task,
)
from mf_dist.flows.stage_cache import clear_stamp, stage_key, stamp_matches, write_stamp


def task_states(flow_run_id) -> dict[str, tuple[str, int]]:
    """Stage name → (state name, run count) of one flow run's task runs."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.split("-")[0]: (run.state.name, run.run_count) for run in runs}


def config_for(client, source: Path, output: Path, work_dir: Path, **settings: object) -> RunConfig:
    return load_config(
        None,
        input=str(source),
        output=str(output),
        work_dir=str(work_dir),
        model="cooccurrence",
        rank=4,
        epochs=2,
        block_size=100,
        scheduler=client.scheduler.address,
        retry_delay_seconds=0,
        **settings,
    )


@pytest.mark.slow
def test_rerun_after_a_late_failure_skips_the_finished_stages(prefect_server, client, tmp_path, tiny_input):
    output = tmp_path / "out"
    output.mkdir()
    # The output itself is fine (a run can start and lock it); only the items
    # table cannot be written, so the run fails in its last stage.
    blocked = output / "items"
    blocked.write_text("a file where the items table's directory should be")
    work_dir = tmp_path / "work"
    failing = config_for(client, tiny_input, output, work_dir, retries=1)

    first = factorization_pipeline(failing, return_state=True)
    assert first.is_failed()
    states = task_states(first.state_details.flow_run_id)
    assert {stage: state for stage, (state, _) in states.items()} == {
        "ingest": "Completed",
        "cooccurrence": "Completed",
        "train": "Completed",
        "export": "Failed",
    }
    assert states["export"][1] == 1, "an unwritable output is an OutputError: retrying cannot help"
    ingest_marker = work_dir / "ingest" / "users.parquet"
    ingested_at = ingest_marker.stat().st_mtime_ns

    blocked.unlink()
    second = factorization_pipeline(failing, return_state=True)
    assert second.is_completed(), second.message
    states = task_states(second.state_details.flow_run_id)
    assert {stage: state for stage, (state, _) in states.items()} == {
        "ingest": "Cached",
        "cooccurrence": "Cached",
        "train": "Cached",
        "export": "Completed",
        "publish": "Completed",
    }
    assert ingest_marker.stat().st_mtime_ns == ingested_at, "a cached stage must not rewrite its files"
    summary = second.result()
    run_id = (output / "items" / "LATEST").read_text().strip()
    assert run_id == summary.run_id
    assert summary.final_loss == pytest.approx(summary.loss_history[-1].loss)

    # Another seed changes training only; the data stages stay cached.
    third = factorization_pipeline(failing.model_copy(update={"seed": 5}), return_state=True)
    states = task_states(third.state_details.flow_run_id)
    assert {stage: state for stage, (state, _) in states.items()} == {
        "ingest": "Cached",
        "cooccurrence": "Cached",
        "train": "Completed",
        "export": "Completed",
        "publish": "Completed",
    }
    assert third.result().final_loss != summary.final_loss


@pytest.mark.slow
def test_a_work_directory_overwritten_by_other_settings_is_not_trusted(
    prefect_server, client, tmp_path, tiny_input
):
    work_dir = tmp_path / "work"
    everything = config_for(client, tiny_input, tmp_path / "out", work_dir)
    liked_only = everything.model_copy(update={"like_threshold": 4.0})

    first = factorization_pipeline(everything, return_state=True).result()
    factorization_pipeline(liked_only, return_state=True).result()
    again = factorization_pipeline(everything, return_state=True)
    states = task_states(again.state_details.flow_run_id)
    # The cache still holds the first run's results, but the files are the second run's.
    assert states["ingest"][0] == "Completed" and states["train"][0] == "Completed"
    assert again.result().n_likes == first.n_likes
    assert again.result().final_loss == pytest.approx(first.final_loss, rel=1e-6)


@pytest.mark.slow
def test_loss_artifacts_are_published(prefect_server, client, tmp_path, tiny_input):
    config = config_for(client, tiny_input, tmp_path / "out", tmp_path / "work", cache=False)
    state = factorization_pipeline(config, return_state=True)
    summary = state.result()
    flow_run_id = state.state_details.flow_run_id
    assert {name for name, _ in task_states(flow_run_id).values()} == {"Completed"}

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["mf-dist-cooccurrence-loss", "mf-dist-cooccurrence-loss-curve"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            )
        )
    by_type = {artifact.type: artifact for artifact in artifacts}
    assert set(by_type) == {"table", "markdown"}
    table = by_type["table"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [row["epoch"] for row in rows] == [record.epoch for record in summary.loss_history]
    assert [row["loss"] for row in rows] == pytest.approx([record.loss for record in summary.loss_history])
    assert "data:image/png;base64,iVBORw0KGgo" in by_type["markdown"].data
    assert summary.run_id in by_type["markdown"].description
    assert (tmp_path / "work" / "reports" / f"loss-{summary.run_id}.png").read_bytes()[:4] == b"\x89PNG"


def test_stage_keys_and_stamps(tmp_path):
    key = stage_key("ingest", "fingerprint", {"block_size": 100})
    assert key == stage_key("ingest", "fingerprint", {"block_size": 100})
    assert key != stage_key("ingest", "fingerprint", {"block_size": 101})
    assert key != stage_key("train", "fingerprint", {"block_size": 100})
    assert not stamp_matches(tmp_path, "ingest", key)
    write_stamp(tmp_path, "ingest", key)
    assert stamp_matches(tmp_path, "ingest", key)
    assert not stamp_matches(tmp_path, "ingest", stage_key("ingest", "other"))
    clear_stamp(tmp_path, "ingest")
    assert not stamp_matches(tmp_path, "ingest", key)


def test_operational_settings_are_real_settings():
    assert set(OPERATIONAL_SETTINGS) <= set(RunConfig.model_fields)


def test_stage_retries_come_from_the_config(tmp_path):
    config = RunConfig(input="in", output=str(tmp_path / "out"), retries=3, retry_delay_seconds=2.5)
    for stage, task in (("ingest", ingest_task), ("cooccurrence", cooccurrence_task), ("train", train_task)):
        configured = task.with_options(**stage_options(config, stage, "key"))
        assert (configured.retries, configured.retry_delay_seconds) == (3, 2.5)
        assert configured.retry_condition_fn is is_transient


def test_only_unexpected_errors_are_retried():
    bad_input = Failed(data=InputError("rating must be finite", file="a.parquet"))
    lost_worker = Failed(data=OSError("connection reset by peer"))
    assert not is_transient(None, None, bad_input)
    assert is_transient(None, None, lost_worker)
