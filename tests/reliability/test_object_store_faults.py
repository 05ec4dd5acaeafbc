"""Killed while exporting to S3: ``LATEST`` stays, readers see the previous run, the next run cleans up.

On S3 there is no rename: a run writes its parts straight under
``runs/<run_id>/`` and its manifest last, and ``LATEST`` (one put) is the
commit point. The process is the real ``mf-dist run``
(:mod:`tests.reliability.killed_export`), ``SIGKILL``ed once its first
table's parts are written; the server is moto on loopback.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from mf_dist import read_embeddings
from mf_dist.storage.filesystems import resolve
from mf_dist.storage.output_lock import LOCK_FILE
from tests.support.object_store import FAKE_CREDENTIALS, moto_server, worker_environment
from tests.support.runs import cli, mf_dist_process, run_flags

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "killed-export"


@pytest.mark.slow
def test_a_run_killed_while_exporting_to_s3_leaves_latest_and_the_next_run_removes_its_debris(
    client, prefect_api, published_source, tmp_path, monkeypatch
):
    import fsspec

    with moto_server() as endpoint:
        environment = {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        fsspec.AbstractFileSystem.clear_instance_cache()
        filesystem, _ = resolve(f"s3://{BUCKET}")
        filesystem.mkdir(BUCKET)
        output, work = f"s3://{BUCKET}/out", f"s3://{BUCKET}/work"
        flags = [*run_flags(published_source, output, client.scheduler.address, "--model", "explicit")]
        flags += ["--work-dir", work]
        with worker_environment(client, environment):
            assert cli(*flags) is None
            previous = {table: latest(filesystem, table) for table in ("items", "users")}

            log = tmp_path / "killed.log"
            process = mf_dist_process(
                ["parts-written", *flags], prefect_api, log, "tests.reliability.killed_export"
            )
            process.wait(timeout=600)
            assert process.returncode == -signal.SIGKILL, log.read_text()

            # LATEST did not move, and a reader following it gets the previous run, whole.
            assert {table: latest(filesystem, table) for table in previous} == previous
            for table, run_id in previous.items():
                embeddings = read_embeddings(output, table)
                assert embeddings.manifest["run_id"] == run_id
                assert len(embeddings.ids) == embeddings.manifest["row_count"]
            debris = unfinished_runs(filesystem)
            assert debris, "the kill left no parts behind"

            # The killed run's locks (output, work dir) are still there: they block until they expire.
            assert "in use by another mf-dist run" in str(cli(*flags))
            for lock in (f"{BUCKET}/out/{LOCK_FILE}", f"{BUCKET}/work/{LOCK_FILE}"):
                # Their expiry passes (written here rather than waited for: 10 minutes).
                held = json.loads(filesystem.cat_file(lock))
                filesystem.pipe_file(lock, json.dumps({**held, "expires": time.time() - 1}).encode())

            assert cli(*flags) is None
            current = {table: latest(filesystem, table) for table in previous}
            assert not set(current.values()) & set(previous.values())
            assert unfinished_runs(filesystem) == []
            for table, run_id in previous.items():
                # The published runs are kept, the one LATEST named before included.
                assert filesystem.exists(f"{BUCKET}/out/{table}/runs/{run_id}/_manifest.json")
                assert read_embeddings(output, table).manifest["run_id"] == current[table]


def latest(filesystem, table: str) -> str:
    return filesystem.cat_file(f"{BUCKET}/out/{table}/LATEST").decode().strip()


def unfinished_runs(filesystem) -> list[str]:
    """``runs/<id>/`` prefixes without a manifest, in every table."""
    filesystem.invalidate_cache()
    runs = filesystem.glob(f"{BUCKET}/out/*/runs/*")
    return sorted(run for run in runs if not filesystem.exists(f"{run}/_manifest.json"))
