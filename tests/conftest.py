"""Shared fixtures: real Dask clusters of worker processes and tiny ratings sets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from distributed import Client

from mf_dist.bench.synthetic import synthetic_ratings
from tests.support.clusters import start_client
from tests.support.data import MOVIELENS_100K, write_input

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def clients() -> Iterator[dict[int, Client]]:
    """Clients of two real local clusters: one and two worker processes."""
    started = {workers: start_client(workers) for workers in (1, 2)}
    yield {workers: client for workers, (_, client) in started.items()}
    for cluster, client in started.values():
        client.close()
        cluster.close()


@pytest.fixture(scope="session")
def client(clients: dict[int, Client]) -> Client:
    """A client of a two-worker cluster of processes."""
    return clients[2]


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[None]:
    """A temporary Prefect server (SQLite in a temp directory) for one test module's in-process flow runs.

    One per module, started and stopped in turn: two of them alive at once in
    one process lose the in-process runs' records. Modules that need a real
    ``prefect server`` process define their own fixture of this name.
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_ratings() -> pd.DataFrame:
    """About 3,000 ratings: 60 users × 300 items, heavy-tailed, no duplicates."""
    return synthetic_ratings(3000, n_users=60, n_items=300, seed=7)


@pytest.fixture
def tiny_input(tmp_path: Path, tiny_ratings: pd.DataFrame) -> Path:
    return write_input(tiny_ratings, tmp_path / "input")


@pytest.fixture(scope="session")
def movielens_100k() -> pd.DataFrame:
    """MovieLens 100K from ../shared/data (skips when it is absent)."""
    if not MOVIELENS_100K.exists():
        pytest.skip(f"MovieLens 100K not found at {MOVIELENS_100K}")
    frame = pd.read_csv(MOVIELENS_100K, sep="\t")
    frame.columns = ["user_id", "item_id", "rating", "timestamp"]
    return frame.astype({"user_id": "int64", "item_id": "int64", "rating": "float32", "timestamp": "int64"})
