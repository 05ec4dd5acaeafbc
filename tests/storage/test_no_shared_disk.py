"""No shared disk: a real ``dask scheduler`` and two ``dask worker`` processes with no path in common.

Each worker runs in its own empty directory (its cwd, ``HOME``, ``TMPDIR``
and Dask scratch space), knows the S3 endpoint and keys from its
environment only, and finds the scheduler by a TCP address, not a file.
Input, work directory and output are all ``s3://`` URLs on a moto server on
loopback, so every block, tile, factor and checkpoint the workers exchange
goes through the store (or through Dask). The published tables equal those
of a local run with the same seed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

from mf_dist import read_embeddings
from mf_dist.config import load_config
from mf_dist.flows.pipeline import factorization_pipeline
from mf_dist.storage.filesystems import resolve
from tests.support.data import write_input
from tests.support.object_store import FAKE_CREDENTIALS, moto_server
from tests.support.paths import REPO
from tests.support.processes import BIN, free_port, process_group

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "no-shared-disk"


@pytest.fixture
def store(tmp_path: Path, tiny_ratings, monkeypatch) -> Iterator[dict[str, str]]:
    """A moto server with the tiny input under s3://BUCKET/ratings/; yields the S3 environment."""
    import fsspec

    with moto_server() as endpoint:
        environment = {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        # Prefect's stored stage results of a work directory URL live in this host's cache.
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "flow-host-cache"))
        fsspec.AbstractFileSystem.clear_instance_cache()
        filesystem = fsspec.filesystem("s3")
        filesystem.mkdir(BUCKET)
        source = write_input(tiny_ratings, tmp_path / "input")
        for file in sorted(source.iterdir()):
            filesystem.put_file(str(file), f"{BUCKET}/ratings/{file.name}")
        yield environment


@pytest.fixture
def separate_workers(tmp_path: Path, store: dict[str, str]) -> Iterator[tuple[str, list[Path]]]:
    """``dask scheduler`` and two ``dask worker`` processes, each in an empty directory of its own."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    code = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    homes = []
    with process_group(tmp_path / "logs") as processes:
        scheduler = [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]
        processes.start("scheduler", scheduler, env=code, cwd=_empty(tmp_path / "scheduler"))
        for index in range(2):
            home = _empty(tmp_path / f"worker-{index}")
            homes.append(home)
            worker = [BIN / "dask", "worker", address, "--nthreads", "1", "--name", f"worker-{index}"]
            worker += ["--host", "127.0.0.1", "--no-dashboard", "--death-timeout", "60"]
            worker += ["--local-directory", home / "dask-scratch"]
            environment = {**code, **store, "HOME": str(home), "TMPDIR": str(home)}
            processes.start(f"worker-{index}", worker, env=environment, cwd=home)
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=90)
            cwds = set(client.run(os.getcwd).values())
        assert cwds == {str(home) for home in homes}
        yield address, homes


def _empty(directory: Path) -> Path:
    directory.mkdir(parents=True)
    return directory


@pytest.mark.slow
def test_workers_with_no_path_in_common_run_the_pipeline_through_the_store(
    prefect_server, client, separate_workers, tmp_path, store
):
    address, homes = separate_workers
    settings = {"model": "explicit", "solver": "gradient", "rank": 3, "epochs": 3, "seed": 5}
    settings |= {"block_size": 64}
    local = factorization_pipeline(
        load_config(
            None,
            input=str(tmp_path / "input"),  # the files the store's copy was made from
            output=str(tmp_path / "local-out"),
            scheduler=client.scheduler.address,
            **settings,
        )
    )
    output = f"s3://{BUCKET}/out"
    remote = factorization_pipeline(
        load_config(
            None,
            input=f"s3://{BUCKET}/ratings/",
            output=output,
            work_dir=f"s3://{BUCKET}/work",
            scheduler=address,
            **settings,
        )
    )

    assert remote.final_loss == pytest.approx(local.final_loss, rel=1e-5)
    for table in ("items", "users"):
        expected, read = read_embeddings(tmp_path / "local-out", table), read_embeddings(output, table)
        assert np.array_equal(read.ids, expected.ids)
        np.testing.assert_allclose(read.vectors, expected.vectors, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(read.bias, expected.bias, rtol=1e-5, atol=1e-6)
    filesystem, root = resolve(f"s3://{BUCKET}/work")
    assert filesystem.ls(f"{root}/ingest/ratings", detail=False)
    # Nothing of the run's data was written on a worker's own disk.
    for home in homes:
        written = [path for path in home.rglob("*") if path.suffix in {".parquet", ".npy", ".npz", ".json"}]
        assert written == [], written
