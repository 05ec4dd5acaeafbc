"""What a user sees: no Dask chatter, and our errors as one line with no engine traceback.

The process test runs ``mf-dist run`` as a user does (a process of its own,
its own local Dask cluster) on an input whose bad value is found inside the
flow, on the workers. The in-process tests check the filter on Prefect's run
loggers: our errors lose the traceback, any other exception keeps it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mf_dist.config import load_config
from mf_dist.errors import ConfigError
from mf_dist.flows import pipeline
from mf_dist.runtime import log_levels
from tests.support.runs import mf_dist_process


def _nan_rating_input(directory: Path) -> Path:
    directory.mkdir()
    frame = pd.DataFrame(
        {"user_id": np.arange(200) % 20, "item_id": np.arange(200) % 50, "rating": np.ones(200)}
    )
    frame.loc[57, "rating"] = np.nan
    frame.to_parquet(directory / "part-0.parquet")
    return directory


def test_a_bad_value_found_on_the_workers_ends_in_one_line(prefect_api, tmp_path, monkeypatch):
    monkeypatch.delenv("MF_DIST_LOG_LEVEL", raising=False)
    source = _nan_rating_input(tmp_path / "input")
    log = tmp_path / "run.log"
    process = mf_dist_process(
        ["run", "--input", source, "--output", tmp_path / "out", "--workers", "1", "--rank", "2"],
        prefect_api,
        log,
    )
    assert process.wait(timeout=300) == 2
    lines = log.read_text().splitlines()
    assert lines[-1].startswith(f"error: {source / 'part-0.parquet'}, column 'rating', row 57:"), lines[-5:]
    assert not [line for line in lines if "Traceback" in line or line.startswith("  File ")]
    assert not [line for line in lines if "distributed." in line]
    assert not (tmp_path / "out" / "items").exists()


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize(
    ("error", "keeps_traceback"),
    [(ConfigError("block_size: must be at least 16"), False), (RuntimeError("a bug of ours"), True)],
)
def test_only_our_errors_lose_their_traceback(
    prefect_server, tmp_path, monkeypatch, tiny_input, error, keeps_traceback
):
    def failing_stage(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline, "ingest_ratings", failing_stage)
    handler = Records()
    flow_logger = logging.getLogger("prefect.flow_runs")
    flow_logger.addHandler(handler)
    config = load_config(
        input=str(tiny_input), output=str(tmp_path / "out"), workers=1, cache=False, retries=0
    )
    try:
        with pytest.raises(type(error)):
            pipeline.factorization_pipeline(config)
    finally:
        flow_logger.removeHandler(handler)
    failures = [record for record in handler.records if record.exc_info or record.levelno >= logging.ERROR]
    assert failures
    assert any(str(error) in record.getMessage() for record in failures)
    assert any(record.exc_info for record in failures) == keeps_traceback


@pytest.mark.parametrize(("value", "expected"), [(None, "WARNING"), ("info", "INFO"), ("DEBUG", "DEBUG")])
def test_dask_logs_at_the_level_asked_for(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(log_levels.LOG_LEVEL_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(log_levels.LOG_LEVEL_VARIABLE, value)
    previous = logging.getLogger("distributed").level
    try:
        assert log_levels.set_dask_log_level() == expected
        assert logging.getLogger("distributed").level == logging.getLevelName(expected)
        assert log_levels.worker_log_environ() == {"DASK_LOGGING__DISTRIBUTED": expected.lower()}
    finally:
        logging.getLogger("distributed").setLevel(previous)


def test_a_bad_log_level_is_a_config_error(monkeypatch):
    monkeypatch.setenv(log_levels.LOG_LEVEL_VARIABLE, "loud")
    with pytest.raises(ConfigError, match="MF_DIST_LOG_LEVEL='loud' is not a log level"):
        log_levels.dask_log_level()
