"""Fixtures of the reliability suite: one Prefect server, one published output to protect.

Every test that makes a run fail starts from a copy of :func:`published`, an
output directory holding a real, complete run (``items`` and ``users`` of the
explicit model), and checks afterwards that every byte of its tables is as
it was (:func:`table_files`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from mf_dist.cli import app
from mf_dist.errors import MfDistError
from tests.conftest import REPO, write_input

# Small enough that a whole run takes seconds on 2 shared cores, big enough
# for several blocks of users and items.
RUN_FLAGS = ["--rank", "2", "--epochs", "2", "--block-size", "64", "--quiet"]


@pytest.fixture(scope="package")
def prefect_api() -> Iterator[str]:
    """A temporary Prefect server for the whole suite; its API URL, for subprocesses too."""
    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


def cli(*args: str | Path) -> Exception | None:
    """Run ``mf-dist ARGS`` in this process; return the error it raised (None: it succeeded).

    In-process, so the flow reuses this session's Prefect server and Dask
    cluster. Errors come back as raised (``main()`` would print ours as one
    line and exit 2); a flag value the parser refuses is a ``typer.BadParameter``.
    """
    try:
        app([str(arg) for arg in args], standalone_mode=False)
    except (MfDistError, typer.BadParameter) as error:
        return error
    return None


def run_flags(source: Path, output: Path, scheduler: str, *extra: str | Path) -> list[str | Path]:
    return ["run", "--input", source, "--output", output, "--scheduler", scheduler, *RUN_FLAGS, *extra]


def mf_dist_process(
    args: list[str | Path], prefect_api: str, log: Path, module: str = "mf_dist.cli"
) -> subprocess.Popen:
    """``mf-dist ARGS`` as a process of its own session (to be killed with all it starts), output to ``log``.

    It uses this session's Prefect server rather than starting its own.
    """
    environment = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "COLUMNS": "200",
    }
    with open(log, "wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", module, *[str(arg) for arg in args]],
            cwd=REPO,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def table_files(output: Path) -> dict[str, str]:
    """Every file of every table under ``output`` (hidden ones too), relative path → SHA-256.

    The work directory and the lock file are not tables; everything else a
    run may create or change is here, so equal snapshots mean that no table,
    no ``LATEST`` and no debris changed.
    """
    files = {}
    for table_dir in sorted(path for path in output.iterdir() if path.is_dir() and path.name != "_work"):
        for path in sorted(table_dir.rglob("*")):
            if path.is_file():
                files[str(path.relative_to(output))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def latest_runs(output: Path) -> dict[str, str]:
    """Table name → the run id its LATEST names."""
    return {latest.parent.name: latest.read_text().strip() for latest in sorted(output.glob("*/LATEST"))}


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
