"""The ``mf-dist`` command as a user runs it: config file plus flags, errors, a full run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mf_dist.config import RunConfig, load_config
from mf_dist.errors import ConfigError
from tests.support.paths import REPO


def mf_dist(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "COLUMNS": "200", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return subprocess.run(
        [sys.executable, "-m", "mf_dist.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=environment,
        check=False,
    )


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_flags_override_the_config_file(tmp_path):
    config = write_toml(
        tmp_path / "run.toml",
        'input = "in"\noutput = "out"\nmodel = "explicit"\nrank = 16\nblock_size = 512\n',
    )
    settings = load_config(config, rank=8, epochs=None)
    assert (settings.model, settings.rank, settings.block_size) == ("explicit", 8, 512)
    assert settings.resolved_epochs == 20
    assert settings.resolved_work_dir == Path("out") / "_work"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('input = "in"\noutput = "out"\nranks = 8\n', r"unknown key 'ranks'"),
        ('input = "in"\noutput = "out"\nrank = "big"\n', r"rank: .*integer.*'big'"),
        ('input = "in"\noutput = "out"\nrank = 0\n', r"rank: .*greater than or equal to 1"),
        ('input = "in"\noutput = "out"\nmodel = "svd"\n', r"model: .*'svd'"),
        ('input = "in"\n', r"output: Field required"),
        ('input = "in"\noutput = "in"\n', r"output must differ from input"),
        ("input = \n", r"not valid TOML"),
    ],
)
def test_bad_config_is_a_config_error_naming_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(write_toml(tmp_path / "run.toml", text))
    assert "run.toml" in str(error.value)


def test_defaults_are_valid():
    settings = RunConfig(input="in", output="out")
    assert settings.resolved_learning_rate > 0 and settings.workers >= 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--input", "nowhere", "--output", "out"], "error: nowhere: input path does not exist"),
        (["run", "--config", "missing.toml"], "error: config file not found: missing.toml"),
        (["run", "--input", "in", "--output", "out", "--rank", "0"], "error: invalid configuration"),
    ],
)
def test_errors_are_one_line_with_exit_status_2(args, message):
    result = mf_dist(*args, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert "Traceback" not in result.stderr


def test_nonsense_flag_value_is_rejected_by_the_parser():
    result = mf_dist("run", "--input", "in", "--output", "out", "--model", "svd", timeout=60)
    assert result.returncode == 2
    assert "'svd' is not one of" in result.stderr


@pytest.mark.slow
def test_run_from_config_file_with_flag_override(client, tmp_path, tiny_input):
    """A real ``mf-dist run`` process: its own temporary Prefect server, our test cluster."""
    output = tmp_path / "out"
    config = write_toml(
        tmp_path / "run.toml",
        f'input = "{tiny_input}"\noutput = "{output}"\nrank = 16\nepochs = 2\nblock_size = 100\n',
    )
    result = mf_dist("run", "--config", str(config), "--rank", "3", "--scheduler", client.scheduler.address)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "table items" in result.stdout and "cooccurrence" in result.stdout
    run_id = (output / "items" / "LATEST").read_text().strip()
    manifest = json.loads((output / "items" / "runs" / run_id / "_manifest.json").read_text())
    assert manifest["rank"] == 3
    assert manifest["config"]["block_size"] == 100
    assert run_id in result.stdout


def test_the_temporary_prefect_server_gets_time_to_start():
    """The CLI gives Prefect's temporary server 120 s to answer (its default, 20 s, ran out under load)."""
    setting = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    environment = {k: v for k, v in os.environ.items() if k != setting}
    code = (
        "import mf_dist.cli\n"
        "from prefect.settings import get_current_settings\n"
        "print(get_current_settings().server.ephemeral.startup_timeout_seconds)"
    )
    shown = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=environment, cwd=REPO
    )
    assert shown.stdout.strip() == "120"
