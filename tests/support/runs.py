"""Running ``mf-dist`` from a test, in this process or as a process of its own, and snapshotting outputs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import typer

from mf_dist.cli import app
from mf_dist.errors import MfDistError
from tests.support.paths import REPO

# Small enough that a whole run takes seconds on 2 shared cores, big enough
# for several blocks of users and items.
RUN_FLAGS = ["--rank", "2", "--epochs", "2", "--block-size", "64", "--quiet"]


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
