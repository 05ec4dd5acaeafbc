"""``./mf``: what each command installs, run against a stand-in Python that records every call.

The stand-in plays the interpreter that makes the venv and the venv's own
``python``, ``pip`` and ``mf-dist``: each logs its arguments and succeeds, so
the script's set-up logic runs for real without installing anything.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support.paths import REPO

STAND_IN = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$MF_TEST_LOG"
if [ "${1:-}" = -m ] && [ "${2:-}" = venv ]; then
  mkdir -p "$3/bin"
  for tool in python pip mf-dist; do cp "$0" "$3/bin/$tool"; done
fi
exit 0
"""


def run_mf(tmp_path: Path, *args: str) -> list[str]:
    """Run ./mf ARGS with the stand-in; returns the calls it logged."""
    python = tmp_path / "python-stand-in"
    if not python.exists():
        python.write_text(STAND_IN)
        python.chmod(python.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHON": str(python),
        "MF_DIST_VENV": str(tmp_path / "venv"),
        "MF_TEST_LOG": str(log),
    }
    completed = subprocess.run(
        [str(REPO / "mf"), *args], capture_output=True, text=True, check=False, env=env
    )
    assert completed.returncode == 0, completed.stderr
    return log.read_text().splitlines() if log.exists() else []


def installs(calls: list[str]) -> list[str]:
    return [call.split(" -e ", 1)[1] for call in calls if call.startswith("pip install") and " -e " in call]


@pytest.mark.parametrize(("command", "then"), [("test", "python -m pytest -q"), ("demo", "mf-dist demo")])
def test_test_and_demo_install_the_package_without_the_bench_extra(tmp_path, command, then):
    calls = run_mf(tmp_path, command, *(["-q"] if command == "test" else []))
    assert installs(calls) == [f"{REPO}[test]"]
    assert calls[-1] == then
    # Set up once: a second run installs nothing.
    assert installs(run_mf(tmp_path, command)) == []


def test_bench_adds_the_bench_extra_on_first_use_only(tmp_path):
    run_mf(tmp_path, "test")
    first = run_mf(tmp_path, "bench", "--scale", "tiny")
    assert installs(first) == [f"{REPO}[test,bench]"]
    assert first[-1] == "mf-dist bench --scale tiny"
    assert installs(run_mf(tmp_path, "bench", "nmf")) == []
    # Other commands still do not install it.
    assert installs(run_mf(tmp_path, "inspect", "out")) == []
