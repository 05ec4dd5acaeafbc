"""A Dask worker process killed mid-stage: the run finishes, with the tables of an undisturbed run.

A cluster of its own (two worker processes under nannies, as ``mf-dist run``
starts them) so that the kills cannot disturb other tests. The flow runs
with no Prefect retries: the stage itself must survive the loss, through
Dask recomputing what the dead worker held. That gives the same numbers
because every task is a pure function of files and block coordinates
(seeds included), wherever and however often it runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from distributed import Client

from mf_dist import read_embeddings
from mf_dist.config import load_config
from mf_dist.flows.pipeline import PipelineSummary, factorization_pipeline
from tests.support.clusters import start_client
from tests.support.data import write_input

from .faults import PLUGIN_NAME, KillWorkerOnTask, killed_worker

# 300 items in blocks of 32: 55 co-occurrence tiles and 10 row blocks per epoch.
SETTINGS = {
    "model": "cooccurrence",
    "rank": 4,
    "epochs": 6,
    "block_size": 32,
    "tolerance": 0.0,
    "seed": 3,
    "retries": 0,
    "cache": False,
}


@pytest.fixture(scope="module")
def fault_client() -> Iterator[Client]:
    cluster, client = start_client(2)
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def fault_source(tmp_path_factory, tiny_ratings) -> Path:
    return write_input(tiny_ratings, tmp_path_factory.mktemp("fault-input"), 3)


def run(client: Client, source: Path, output: Path) -> PipelineSummary:
    config = load_config(
        None, input=str(source), output=str(output), scheduler=client.scheduler.address, **SETTINGS
    )
    return factorization_pipeline(config)


@pytest.fixture(scope="module")
def undisturbed(prefect_api, fault_client, fault_source, tmp_path_factory) -> tuple[PipelineSummary, Path]:
    output = tmp_path_factory.mktemp("undisturbed") / "out"
    return run(fault_client, fault_source, output), output


# One worker dies as it starts its 10th of ~27 tile stores (the slabs and tiles
# it holds are lost), one as it starts its 10th row-block update, ~5 a worker
# per epoch, so in epoch 2 or 3 of 6 (factor blocks, Adam state and resident
# tiles lost).
KILLS = {"store_tile": 10, "update_block": 10}


@pytest.mark.slow
def test_run_survives_workers_killed_in_cooccurrence_and_in_training(
    fault_client, fault_source, undisturbed, tmp_path
):
    reference, reference_output = undisturbed
    markers = tmp_path / "killed"
    markers.mkdir()
    fault_client.register_plugin(KillWorkerOnTask(KILLS, str(markers)), name=PLUGIN_NAME)
    try:
        summary = run(fault_client, fault_source, tmp_path / "out")
    finally:
        fault_client.unregister_worker_plugin(PLUGIN_NAME)
        # A nanny starts a new worker in each dead one's place; leave two behind.
        fault_client.wait_for_workers(2, timeout=120)

    for function in KILLS:
        killed = killed_worker(markers, function)
        assert killed is not None, f"no worker started {KILLS[function]} {function} tasks: no fault"
        pid, key = killed
        assert key.startswith(function)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

    assert summary.epochs == reference.epochs
    np.testing.assert_allclose(
        [r.loss for r in summary.loss_history], [r.loss for r in reference.loss_history], rtol=1e-6
    )
    items = read_embeddings(tmp_path / "out" / "items")
    expected = read_embeddings(reference_output / "items")
    np.testing.assert_array_equal(items.ids, expected.ids)
    np.testing.assert_allclose(items.vectors, expected.vectors, rtol=1e-5, atol=1e-6)
