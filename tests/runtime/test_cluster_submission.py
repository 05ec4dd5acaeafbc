"""Joining an existing Dask scheduler, and one worker per GPU with the GPU resource.

A real ``dask scheduler`` and two ``dask worker`` processes run on loopback:
one advertises ``GPU=1``, the other is CPU-only. The pipeline runs through
them and must publish the same factors as the embedded local cluster with
the same seed and number of workers; training tasks must ask for the GPU
resource (so they land on the GPU worker) while ingest and co-occurrence
also use the CPU-only one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from distributed import Client, SpecCluster

import mf_dist.runtime.cluster
from mf_dist.config import load_config
from mf_dist.flows.pipeline import factorization_pipeline
from mf_dist.runtime.cluster import (
    LOOPBACK_SCHEDULER,
    gpu_worker_specs,
    open_client,
    training_resources,
    visible_gpu_ids,
)
from tests.support.dask_placement import PlacementRecorder, placement_records
from tests.support.paths import REPO
from tests.support.processes import BIN, process_group, wait_until


@pytest.fixture
def external_cluster(tmp_path: Path) -> Iterator[str]:
    """``dask scheduler`` plus a GPU-resource worker and a CPU-only worker; yields the address."""
    scheduler_file = tmp_path / "scheduler.json"
    # The placement recorder is imported by the scheduler process from this checkout.
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    worker = [BIN / "dask", "worker", "--scheduler-file", scheduler_file, "--nthreads", "1"]
    worker += ["--host", "127.0.0.1", "--no-dashboard", "--death-timeout", "60"]
    with process_group(tmp_path / "logs") as processes:
        scheduler = [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"]
        processes.start("scheduler", [*scheduler, "--scheduler-file", scheduler_file], env=env)
        wait_until(scheduler_file.exists, 60, "the scheduler file", processes)
        address = json.loads(scheduler_file.read_text())["address"]
        processes.start("worker-gpu", [*worker, "--name", "gpu-0", "--resources", "GPU=1"], env=env)
        processes.start("worker-cpu", [*worker, "--name", "cpu-0"], env=env)
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
            client.register_plugin(PlacementRecorder())
        yield address


def published_embeddings(output: Path, table: str = "items") -> dict[object, np.ndarray]:
    run_id = (output / table / "LATEST").read_text().strip()
    frame = pq.read_table(output / table / "runs" / run_id)
    ids = frame.column(0).to_pylist()
    vectors = frame["embedding"].combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
    return dict(zip(ids, vectors, strict=True))


@pytest.mark.slow
def test_external_scheduler_gives_the_local_cluster_result(
    prefect_server, external_cluster, tmp_path, tiny_input
):
    settings = {"input": str(tiny_input), "model": "cooccurrence", "rank": 4, "epochs": 3}
    settings |= {"block_size": 100, "seed": 11, "workers": 2}
    local = factorization_pipeline(load_config(None, output=str(tmp_path / "local"), **settings))
    joined = factorization_pipeline(
        load_config(None, output=str(tmp_path / "joined"), scheduler=external_cluster, **settings)
    )

    assert joined.final_loss == pytest.approx(local.final_loss, rel=1e-6)
    local_vectors = published_embeddings(tmp_path / "local")
    joined_vectors = published_embeddings(tmp_path / "joined")
    assert local_vectors.keys() == joined_vectors.keys()
    for item, vector in local_vectors.items():
        np.testing.assert_allclose(joined_vectors[item], vector, rtol=0, atol=1e-6)

    with Client(external_cluster, timeout="30s") as client:
        records = client.run_on_scheduler(placement_records)
        names = {
            info["name"]: address for address, info in client.scheduler_info(n_workers=-1)["workers"].items()
        }
    restricted = [(prefix, worker) for prefix, worker, resources in records if resources == {"GPU": 1}]
    assert restricted, "training submitted no task that asks for the GPU resource"
    assert {worker for _, worker in restricted} == {names["gpu-0"]}
    cpu_prefixes = {prefix for prefix, worker, _ in records if worker == names["cpu-0"]}
    assert cpu_prefixes & {"scan_partition", "index_partition", "finalise_block", "liked_slabs"}, cpu_prefixes


def test_one_worker_per_gpu_sees_only_its_gpu():
    """The local GPU cluster's specs, started for real with GPU ids as plain strings (no GPU needed)."""
    specs = gpu_worker_specs(["3", "5"], threads_per_worker=1)
    with SpecCluster(workers=specs, scheduler=LOOPBACK_SCHEDULER) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        assert sorted(seen.values()) == ["3", "5"]
        assert [w["resources"] for w in workers] == [{"GPU": 1}, {"GPU": 1}]
        assert {w["nthreads"] for w in workers} == {1}
        assert all(address.startswith("tcp://127.0.0.1:") for address in seen)
        assert training_resources(client) == {"GPU": 1}


def test_local_workers_keep_freed_blocks_for_reuse(monkeypatch):
    """Workers of a cluster started here get the allocator settings (and Dask's own thread limits).

    Variables already in this process's environment win over Dask's config,
    and a nanny started in this process (another test's) leaves its own there.
    """
    import dask

    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    before = dask.config.get("distributed.nanny.pre-spawn-environ")
    with open_client(workers=1) as client:
        seen = next(iter(client.run(lambda: dict(os.environ)).values()))
    assert seen["MALLOC_MMAP_THRESHOLD_"] == str(32 * 1024 * 1024)
    assert seen["MALLOC_TRIM_THRESHOLD_"] == str(256 * 1024 * 1024)
    assert seen["OMP_NUM_THREADS"] == "1"
    assert dask.config.get("distributed.nanny.pre-spawn-environ") == before


def test_training_asks_for_no_resource_without_gpu_workers(client):
    assert training_resources(client) is None


@pytest.mark.parametrize(
    ("inherited", "count", "expected"),
    [(None, 2, ["0", "1"]), ("2,7", 2, ["2", "7"]), ("GPU-1f2e,GPU-9a8b", 1, ["GPU-1f2e"]), ("", 0, [])],
)
def test_gpu_ids_respect_an_inherited_cuda_visible_devices(monkeypatch, inherited, count, expected):
    monkeypatch.setattr(mf_dist.runtime.cluster, "visible_gpu_count", lambda: count)
    if inherited is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", inherited)
    assert visible_gpu_ids() == expected
