"""Fixtures of the reliability suite: one Prefect server, one published output to protect.

Every test that makes a run fail starts from a copy of :func:`published`, an
output directory holding a real, complete run (``items`` and ``users`` of the
explicit model), and checks afterwards that every byte of its tables is as
it was (:func:`table_files`).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from tests.support.data import write_input
from tests.support.runs import cli, latest_runs, run_flags


@pytest.fixture(scope="package")
def prefect_api() -> Iterator[str]:
    """A temporary Prefect server for the whole suite; its API URL, for subprocesses too."""
    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="package")
def published_source(tmp_path_factory: pytest.TempPathFactory, tiny_ratings) -> Path:
    return write_input(tiny_ratings, tmp_path_factory.mktemp("published-input"), 3)


@pytest.fixture(scope="package")
def published(prefect_api, client, tmp_path_factory: pytest.TempPathFactory, published_source) -> Path:
    """An output directory with one complete explicit-model run (items and users)."""
    output = tmp_path_factory.mktemp("published") / "out"
    assert cli(*run_flags(published_source, output, client.scheduler.address, "--model", "explicit")) is None
    assert set(latest_runs(output)) == {"items", "users"}
    return output


@pytest.fixture
def output_copy(published: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`published` that a test may try to damage."""
    copy = tmp_path / "published-copy"
    shutil.copytree(published, copy, symlinks=True)
    return copy
