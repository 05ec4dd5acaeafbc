"""Input and output on an object store: a real S3 API (moto's server on loopback), a real cluster.

The workers read the input and write the tables through s3fs with the
credentials and endpoint of their own environment (``AWS_*``,
``AWS_ENDPOINT_URL``); the work directory stays local. Nothing of ours is
mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mf_dist import cli, read_embeddings
from mf_dist.config import load_config
from mf_dist.errors import ConfigError, InputError, OutputError
from mf_dist.flows.pipeline import factorization_pipeline
from mf_dist.storage.filesystems import redacted_options, resolve
from mf_dist.storage.input_files import check_schemas, list_input_files
from mf_dist.storage.output_lock import exclusive_object_store
from tests.support.data import write_input
from tests.support.object_store import FAKE_CREDENTIALS, moto_server, worker_environment
from tests.support.paths import REPO

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "ratings-bucket"


@pytest.fixture(scope="module")
def s3(client, tiny_ratings, tmp_path_factory):
    """A moto S3 server with a bucket holding the tiny input under ratings/; yields its environment.

    The environment (endpoint and fake keys) is set in this process and on the workers.
    """
    import fsspec

    with moto_server() as endpoint, pytest.MonkeyPatch.context() as patch:
        environment = {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
        for name, value in environment.items():
            patch.setenv(name, value)
        fsspec.AbstractFileSystem.clear_instance_cache()
        filesystem = fsspec.filesystem("s3")
        filesystem.mkdir(BUCKET)
        source = write_input(tiny_ratings, tmp_path_factory.mktemp("object-store") / "input")
        for file in sorted(source.iterdir()):
            filesystem.put_file(str(file), f"{BUCKET}/ratings/{file.name}")
        filesystem.pipe_file(f"{BUCKET}/ratings/_SUCCESS", b"")
        with worker_environment(client, environment):
            yield environment


def run(client, input_path: str, output: str, work_dir: Path | str, **settings: object):
    config = load_config(
        None,
        input=input_path,
        output=output,
        work_dir=str(work_dir),
        scheduler=client.scheduler.address,
        **{"model": "explicit", "rank": 4, "epochs": 3, "block_size": 100, "seed": 3, **settings},
    )
    return factorization_pipeline(config)


def test_input_files_and_schemas_are_read_from_the_bucket(s3, tiny_ratings):
    files = list_input_files(f"s3://{BUCKET}/ratings/")
    assert files == [f"s3://{BUCKET}/ratings/part-{i:05d}.parquet" for i in range(3)]
    assert list_input_files(f"s3://{BUCKET}/ratings/part-*.parquet") == files
    columns = check_schemas(
        files, user_col="user_id", item_col="item_id", rating_col="rating", timestamp_col="timestamp"
    )
    assert columns.rating == "rating"


def test_a_run_on_the_object_store_publishes_the_tables_of_a_local_run(
    prefect_server, s3, client, tmp_path, tiny_input
):
    local = run(client, str(tiny_input), str(tmp_path / "out"), tmp_path / "work-local")
    output = f"s3://{BUCKET}/out"
    remote = run(client, f"s3://{BUCKET}/ratings/", output, tmp_path / "work-s3")

    filesystem, _ = resolve(output)
    for table in ("items", "users"):
        run_id = filesystem.cat_file(f"{BUCKET}/out/{table}/LATEST").decode().strip()
        assert run_id == remote.run_id
        run_dir = f"{BUCKET}/out/{table}/runs/{run_id}"
        manifest = json.loads(filesystem.cat_file(f"{run_dir}/_manifest.json"))
        assert manifest["row_count"] == sum(entry["rows"] for entry in manifest["files"])
        assert filesystem.isfile(f"{run_dir}/_loss_curve.png")
        # Read back by pyarrow through s3fs, as a downstream reader would.
        from_store = pq.read_table(f"{run_dir}/part-00000.parquet", filesystem=filesystem)
        expected = read_embeddings(tmp_path / "out", table)
        read = read_embeddings(output, table)
        assert read.manifest["run_id"] == remote.run_id and read.path == f"s3://{run_dir}"
        assert np.array_equal(read.ids, expected.ids)
        assert np.array_equal(read.vectors, expected.vectors)
        assert np.array_equal(read.bias, expected.bias)
        assert from_store.num_rows == len(expected)
        assert local.final_loss == remote.final_loss

    # mf-dist inspect reads the manifests from the store.
    shown = CliRunner().invoke(cli.app, ["inspect", output], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert f"items · run {remote.run_id} (current)" in shown.output
    assert f"users · run {remote.run_id} (current)" in shown.output
    assert f"s3://{BUCKET}/out/items/runs/{remote.run_id}/_loss_curve.png" in shown.output

    # A second run moves LATEST; the first stays readable by its run URL.
    again = run(client, f"s3://{BUCKET}/ratings/", output, tmp_path / "work-s3")
    assert read_embeddings(output).manifest["run_id"] == again.run_id
    assert read_embeddings(f"{output}/items/runs/{remote.run_id}").manifest["run_id"] == remote.run_id


def test_the_documented_recipes_read_the_published_table_with_the_endpoint(
    prefect_server, s3, client, tmp_path, tiny_input
):
    """docs/tables.md, "Object stores": pyarrow and Polars read the current run by LATEST.

    DuckDB's S3 support is an extension it downloads on first use: not tried here.
    """
    import polars as pl
    import pyarrow.fs

    output = f"s3://{BUCKET}/recipes"
    summary = run(client, str(tiny_input), output, tmp_path / "work")
    expected = read_embeddings(output, "items")
    endpoint = s3["AWS_ENDPOINT_URL"]

    # pyarrow
    store = pyarrow.fs.S3FileSystem(endpoint_override=endpoint, region="us-east-1")
    with store.open_input_stream(f"{BUCKET}/recipes/items/LATEST") as latest:
        run_id = latest.read().decode().strip()
    table = pq.read_table(f"{BUCKET}/recipes/items/runs/{run_id}", filesystem=store)
    # Polars
    options = {"aws_endpoint_url": endpoint, "aws_region": "us-east-1", "aws_allow_http": "true"}
    frame = pl.read_parquet(f"{output}/items/runs/{run_id}/*.parquet", storage_options=options)

    assert run_id == summary.run_id
    for ids in (table["item_id"].to_numpy(), frame["item_id"].to_numpy()):
        assert np.array_equal(ids, expected.ids)
    assert np.array_equal(np.stack(frame["embedding"].to_list()).astype(np.float32), expected.vectors)


@pytest.mark.parametrize(
    ("model", "solver"),
    [
        # Ratings blocks, factor blocks, optimiser state in the checkpoints.
        ("explicit", "gradient"),
        # Co-occurrence tiles (dense and sparse) and the diagonal.
        pytest.param("cooccurrence", "als", marks=pytest.mark.slow),
    ],
)
def test_input_work_and_output_on_the_store_give_the_tables_of_a_local_run(
    prefect_server, s3, client, tmp_path, tiny_input, model, solver
):
    settings = {"model": model, "solver": solver, "holdout": 0.1, "rank": 3, "block_size": 64}
    local = run(client, str(tiny_input), str(tmp_path / "out"), tmp_path / "work", **settings)
    output, work = f"s3://{BUCKET}/all-{model}/out", f"s3://{BUCKET}/all-{model}/work"
    remote = run(client, f"s3://{BUCKET}/ratings/", output, work, **settings)

    assert remote.final_loss == pytest.approx(local.final_loss, rel=1e-5)
    assert remote.evaluation == pytest.approx(local.evaluation, rel=1e-5)
    for table in [table.name for table in local.export.tables]:
        expected, read = read_embeddings(tmp_path / "out", table), read_embeddings(output, table)
        assert np.array_equal(read.ids, expected.ids)
        np.testing.assert_allclose(read.vectors, expected.vectors, rtol=1e-5, atol=1e-6)
    # Everything intermediate is in the store: stage records, checkpoints, stamps, the loss curve.
    filesystem, root = resolve(work)
    assert json.loads(filesystem.cat_file(f"{root}/ingest/summary.json"))["directory"] == f"{work}/ingest"
    assert filesystem.exists(f"{root}/_stages/train.key")
    assert filesystem.ls(f"{root}/checkpoints/{model}", detail=False)
    assert filesystem.exists(f"{root}/reports/loss-{remote.run_id}.png")
    assert not filesystem.exists(f"{root}/ingest/_staging")
    if model == "cooccurrence":
        assert json.loads(filesystem.cat_file(f"{root}/cooccurrence/summary.json"))["tiles"]
    # A cached second run finds its stages through the stamps in the store.
    again = run(client, f"s3://{BUCKET}/ratings/", output, work, **settings)
    assert again.final_loss == remote.final_loss
    # A warm start from the published tables on the store starts where they ended.
    warm = run(client, f"s3://{BUCKET}/ratings/", f"{output}-warm", work, init_from=output, **settings)
    assert warm.loss_history[0].loss < remote.loss_history[0].loss
    assert read_embeddings(f"{output}-warm").manifest["config"]["init_from"] == output


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3:///out", "s3:///out: no bucket in the URL"),
        ("s3://", "s3://: no bucket in the URL"),
        ("nosuchscheme://bucket/out", "nosuchscheme://bucket/out: unknown storage scheme"),
    ],
)
def test_urls_that_name_no_location_are_config_errors(tmp_path, tiny_input, url, message):
    with pytest.raises(ConfigError) as raised:
        load_config(None, input=str(tiny_input), output=url, work_dir=str(tmp_path / "work"))
    assert message in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(ConfigError, match=r"unknown storage scheme|no bucket"):
        read_embeddings(url)


def test_a_missing_bucket_is_one_line_and_nothing_is_published(s3, tmp_path):
    url = "s3://no-such-bucket/out"
    with pytest.raises(OutputError) as raised:
        read_embeddings(url)
    assert str(raised.value) == f"{url}: bucket 'no-such-bucket' does not exist"
    with pytest.raises(InputError) as raised:
        list_input_files("s3://no-such-bucket/ratings/")
    assert str(raised.value) == "s3://no-such-bucket/ratings/: bucket 'no-such-bucket' does not exist"
    with pytest.raises(InputError, match=r"ratings-bucket/nothing-here: input path does not exist"):
        list_input_files(f"s3://{BUCKET}/nothing-here")

    # The command line: exit status 2, one line, before any work, nothing written.
    work_dir = tmp_path / "work"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mf_dist.cli",
            "run",
            "--input",
            f"s3://{BUCKET}/ratings/",
            "--output",
            url,
            "--work-dir",
            str(work_dir),
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **s3, "PYTHONPATH": str(REPO), "COLUMNS": "400"},
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {url}: bucket 'no-such-bucket' does not exist"], result.stderr
    assert not (work_dir / "ingest").exists()
    filesystem, _ = resolve(f"s3://{BUCKET}")
    assert "no-such-bucket" not in [path.rstrip("/") for path in filesystem.ls("", detail=False)]


def test_secret_storage_options_are_masked_in_manifests():
    options = {"endpoint_url": "http://127.0.0.1:9000", "key": "AKIA", "secret": "s", "token": "t"}
    assert redacted_options(options) == {
        "endpoint_url": "http://127.0.0.1:9000",
        "key": "***",
        "secret": "***",
        "token": "***",
    }


def test_storage_options_reach_the_workers_and_no_secret_is_written(
    prefect_server, s3, client, tmp_path, tiny_input
):
    """Workers without endpoint or keys of their own get the config's storage options (and only in memory).

    The secret given in ``storage_options`` is found in no object of the work
    directory or the output (records, checkpoints, stamps, manifests, reports),
    nor in the flow host's stored stage results.
    """
    secret = "do-not-write-this-secret-4711"
    config_file = tmp_path / "run.toml"
    config_file.write_text(
        f'input = "s3://{BUCKET}/ratings/"\noutput = "s3://{BUCKET}/secret/out"\n'
        f'work_dir = "s3://{BUCKET}/secret/work"\nscheduler = "{client.scheduler.address}"\n'
        'model = "explicit"\nsolver = "gradient"\nrank = 3\nepochs = 2\nblock_size = 64\n'
        # The derived tables' tasks open the store on the workers with the same options.
        'neighbors = 2\nrecommend = 2\nann = "hnsw"\n'
        f'[storage_options]\nendpoint_url = "{s3["AWS_ENDPOINT_URL"]}"\nkey = "storage-key"\n'
        f'secret = "{secret}"\n'
    )
    nothing = {name: None for name in [*FAKE_CREDENTIALS, "AWS_ENDPOINT_URL"] if name != "AWS_DEFAULT_REGION"}
    nothing |= {
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        with worker_environment(client, nothing):
            summary = factorization_pipeline(load_config(config_file))
    assert read_embeddings(f"s3://{BUCKET}/secret/out").manifest["run_id"] == summary.run_id
    assert summary.neighbors and summary.recommendations and summary.ann

    def options_on_workers() -> dict:
        from mf_dist.storage import store

        return dict(store._OPTIONS)

    # The options left the workers with the run.
    assert all(options == {} for options in client.run(options_on_workers).values())
    filesystem, _ = resolve(f"s3://{BUCKET}")
    objects = filesystem.find(f"{BUCKET}/secret")
    assert any("/work/checkpoints/" in name for name in objects)
    assert any(name.endswith("_manifest.json") for name in objects)
    for name in objects:
        assert secret.encode() not in filesystem.cat_file(name), name
    stored = [path for path in (tmp_path / "cache").rglob("*") if path.is_file()]
    assert stored
    for path in stored:
        assert secret.encode() not in path.read_bytes(), path


def test_storage_options_come_from_the_config_file_only(tmp_path, tiny_input):
    config_file = tmp_path / "run.toml"
    config_file.write_text(
        f'input = "{tiny_input}"\noutput = "s3://{BUCKET}/out"\nwork_dir = "{tmp_path / "w"}"\n'
        '[storage_options]\nendpoint_url = "http://127.0.0.1:9"\n'
    )
    config = load_config(config_file)
    assert config.storage_options == {"endpoint_url": "http://127.0.0.1:9"}
    # Without a work_dir the intermediate data goes under the output, on the store too.
    config = load_config(None, input=str(tiny_input), output=f"s3://{BUCKET}/out")
    assert config.work_location == f"s3://{BUCKET}/out/_work"


def test_a_second_writer_of_one_output_url_is_refused_until_the_first_has_finished(s3):
    output = f"s3://{BUCKET}/locked"
    filesystem, root = resolve(output)
    with exclusive_object_store(output, purpose="run A"):
        assert filesystem.isfile(f"{root}/.mf-dist.lock")
        with (
            pytest.raises(OutputError, match=r"in use by another mf-dist run \(pid \d+ on .*, run A\)"),
            exclusive_object_store(output, purpose="run B"),
        ):
            pass
    assert not filesystem.exists(f"{root}/.mf-dist.lock")
    with exclusive_object_store(output, purpose="run B"):
        pass


def test_the_expired_lock_of_a_killed_run_is_taken_over(s3):
    output = f"s3://{BUCKET}/killed"
    filesystem, root = resolve(output)
    stale = {"pid": 1, "host": "gone", "started": "then", "expires": time.time() - 1, "token": "old"}
    filesystem.pipe_file(f"{root}/.mf-dist.lock", json.dumps(stale).encode())
    with exclusive_object_store(output, purpose="run C"):
        held = json.loads(filesystem.cat_file(f"{root}/.mf-dist.lock"))
        assert held["token"] != "old" and held["purpose"] == "run C"


def test_no_credentials_is_one_line_naming_the_url(s3, monkeypatch, tmp_path):
    from s3fs import S3FileSystem

    for name in FAKE_CREDENTIALS:
        if name != "AWS_DEFAULT_REGION":
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(InputError) as raised:
            list_input_files(f"s3://{BUCKET}/ratings/")
        assert str(raised.value).startswith(f"s3://{BUCKET}/ratings/: no credentials for s3://;")
        with pytest.raises(OutputError, match=r"^s3://ratings-bucket/out: no credentials for s3://;"):
            read_embeddings(f"s3://{BUCKET}/out")
    finally:
        S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize(("url", "package", "extra"), [("gs://bucket/out", "gcsfs", "gcs")])
def test_a_missing_extra_names_the_pip_command(url, package, extra):
    try:
        __import__(package)
    except ImportError:
        pass
    else:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(ConfigError) as raised:
        read_embeddings(url)
    assert (
        str(raised.value)
        == f"{url}: gs:// needs {package}, which is not installed: pip install 'mf-dist[{extra}]'"
    )


def test_file_urls_are_local_paths(tmp_path, tiny_input):
    config = load_config(None, input=f"file://{tiny_input}", output=f"file://{tmp_path}/out")
    assert (config.input, config.output) == (str(tiny_input), f"{tmp_path}/out")
    assert list_input_files(f"file://{tiny_input}") == list_input_files(str(tiny_input))


def test_a_failed_export_publishes_nothing_and_latest_stays_on_the_previous_run(
    prefect_server, s3, client, tmp_path, tiny_input
):
    """Workers without credentials: the parts cannot be written, the run fails with one line."""
    output = f"s3://{BUCKET}/failing"
    first = run(client, str(tiny_input), output, tmp_path / "work")
    filesystem, root = resolve(output)
    without_credentials = {name: None for name in FAKE_CREDENTIALS if name != "AWS_DEFAULT_REGION"}
    without_credentials |= {
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with (
        worker_environment(client, without_credentials),
        pytest.raises(
            OutputError,
            match=rf"^{output}/(items|users)/runs/[^ /]+/part-00000.parquet: no credentials for s3://;",
        ),
    ):
        run(client, str(tiny_input), output, tmp_path / "work", epochs=2)
    for table in ("items", "users"):
        assert filesystem.cat_file(f"{root}/{table}/LATEST").decode().strip() == first.run_id
        runs = [path.rsplit("/", 1)[1] for path in filesystem.ls(f"{root}/{table}/runs", detail=False)]
        assert runs == [first.run_id]
    assert not filesystem.exists(f"{root}/.mf-dist.lock")
    assert read_embeddings(output).manifest["run_id"] == first.run_id
