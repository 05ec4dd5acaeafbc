"""``mf-dist run``'s flags, made from the run configuration: one per setting, overriding the file."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

import pytest
import typer
from pydantic import Field
from rich.markup import escape
from typer.testing import CliRunner

from mf_dist import cli
from mf_dist.config import RunConfig
from mf_dist.config_flags import config_flags, flag_name, is_flag
from mf_dist.errors import ConfigError
from mf_dist.registry import MODELS

runner = CliRunner()
# Rich wraps help at the terminal's width; wide enough that no help text is cut.
WIDE = {"COLUMNS": "250"}

# The flags of each command before they were generated from the config: none may go.
RUN_FLAGS_BEFORE = """
--input --output --config --model --solver --rank --epochs --learning-rate --regularization --batch-size
--optimizer --alpha --als-method --cg-steps --loss --log-target --no-log-target --target --x-products
--tolerance --resume --no-resume --init-from --holdout --workers --threads-per-worker --scheduler --cluster
--like-threshold --rating-min --rating-max --block-size --seed --user-col --item-col --rating-col
--timestamp-col --duplicates --work-dir --device --neighbors --quiet -q
""".split()  # noqa: SIM905 (words read better than a list of 43 strings)
DEMO_FLAGS_BEFORE = """
--output --ratings --model --rank --epochs --workers --seed --neighbors --quiet -q
""".split()  # noqa: SIM905


def command_options(app: typer.Typer, name: str) -> dict[str, object]:
    """The click parameters of (sub)command ``name``, by parameter name."""
    command = typer.main.get_command(app)
    command = command.commands[name] if hasattr(command, "commands") else command
    return {param.name: param for param in command.params}


def all_flags(app: typer.Typer, name: str) -> set[str]:
    return {
        flag for param in command_options(app, name).values() for flag in [*param.opts, *param.secondary_opts]
    }


@pytest.mark.parametrize(("command", "before"), [("run", RUN_FLAGS_BEFORE), ("demo", DEMO_FLAGS_BEFORE)])
def test_every_flag_of_before_is_still_there(command, before):
    assert set(before) <= all_flags(cli.app, command)


def test_every_run_setting_is_a_flag_with_its_description_as_help():
    """All of RunConfig's fields; of the ``cluster`` table, only its kind (``--cluster``).

    The cluster's [cluster.slurm] and [cluster.kubernetes] settings are left to the config file,
    and so are the fields declared config-file only (``storage_options``, a mapping).
    """
    options = command_options(cli.app, "run")
    assert "storage_options" not in options
    for name, field in RunConfig.model_fields.items():
        if not is_flag(field):
            continue
        assert name in options, f"no flag for RunConfig.{name}"
        assert options[name].opts == [flag_name(name)]
        assert options[name].help == escape(field.description)


def test_run_help_lists_every_option_with_help():
    result = runner.invoke(cli.app, ["run", "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    for name, field in RunConfig.model_fields.items():
        assert flag_name(name) in result.output or not is_flag(field)
    assert "[cluster.*]" in result.output  # square brackets survive rich markup
    assert "--config" in result.output and "--verbose" in result.output


class StopError(Exception):
    """Raised instead of running the pipeline, with the configuration it would have run."""


@pytest.fixture
def run_config(monkeypatch):
    """``mf-dist ARGS`` in this process; returns the RunConfig that ``run`` would run."""

    def stop(config: RunConfig) -> None:
        raise StopError(config)

    monkeypatch.setattr(cli, "_run", stop)

    def invoke(*args: str | Path) -> RunConfig:
        with pytest.raises(StopError) as stopped:
            cli.app([str(arg) for arg in args], standalone_mode=False)
        return stopped.value.args[0]

    return invoke


RUN_TOML = """
input = "in"
output = "out"
model = "explicit"
rank = 16
batch_size = 256
block_size = 512
cache = false
log_target = true

[cluster]
kind = "local"

[cluster.slurm]
queue = "gpu"
cores = 8
"""


def test_flags_override_the_file_and_unset_flags_keep_it(tmp_path, run_config):
    config = tmp_path / "run.toml"
    config.write_text(RUN_TOML)
    settings = run_config(
        "run", "--config", config, "--quiet", "--rank", "3", "--epochs", "4", "--cluster", "slurm", "--cache",
        "--no-log-target", "--batch-size", "1024", "--solver", "gradient",
    )  # fmt: skip
    assert (settings.rank, settings.epochs, settings.solver) == (3, 4, "gradient")
    assert (settings.cache, settings.log_target) == (True, False)
    # A flag given with the default's value still overrides the file.
    assert settings.batch_size == 1024
    # Unset flags keep the file's values, and --cluster keeps the file's [cluster.slurm].
    assert (settings.model, settings.block_size, settings.input) == ("explicit", 512, "in")
    assert settings.cluster.kind == "slurm"
    assert (settings.cluster.slurm.queue, settings.cluster.slurm.cores) == ("gpu", 8)


def test_without_a_file_flags_make_the_whole_config(run_config):
    settings = run_config("run", "--input", "in", "--output", "out", "--quiet", "--neighbors-metric", "dot")
    expected = RunConfig(input="in", output="out", neighbors_metric="dot")
    assert settings == expected


@pytest.mark.parametrize(
    ("flag", "value"), [("--model", "svd"), ("--solver", "sgd"), ("--cluster", "pbs"), ("--device", "tpu")]
)
def test_a_flag_value_outside_the_choices_is_refused_by_the_parser(run_config, flag, value):
    with pytest.raises(typer.BadParameter, match=f"'{value}' is not one of"):
        cli.app(["run", "--input", "in", "--output", "out", flag, value], standalone_mode=False)


def test_only_the_flags_given_reach_the_command():
    app = typer.Typer()
    seen: dict[str, object] = {}

    @app.command()
    @config_flags(RunConfig, names=("model", "rank", "epochs", "workers"))
    def demo(flags: dict[str, object], seed: int = 0) -> None:
        seen.update(flags, seed=seed)

    result = runner.invoke(app, ["--rank", "5", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert seen == {"rank": 5, "seed": 2}


class ExtendedConfig(RunConfig):
    """The run config with settings someone adds later."""

    knob: int = Field(3, ge=0, description="A knob added in a test.")
    flavour: Literal["sweet", "sour"] = Field("sweet", description="A choice added in a test.")
    shiny: bool = Field(False, description="A switch added in a test.")


def test_a_setting_added_to_the_config_becomes_a_flag():
    app = typer.Typer()
    built = []

    @app.command()
    @config_flags(ExtendedConfig)
    def run(flags: dict[str, object], config: str | None = None) -> None:
        built.append(ExtendedConfig(**{"input": "in", "output": "out", **flags}))

    shown = runner.invoke(app, ["--help"], env=WIDE)
    assert shown.exit_code == 0, shown.output
    for flag, text in [
        ("--knob", "A knob added in a test."),
        ("--flavour", "A choice added in a test."),
        ("--shiny", "A switch added in a test."),
    ]:
        assert flag in shown.output and text in shown.output
    assert "--no-shiny" in shown.output and "sweet|sour" in shown.output

    result = runner.invoke(app, ["--knob", "7", "--flavour", "sour", "--shiny", "--rank", "4"])
    assert result.exit_code == 0, result.output
    assert (built[0].knob, built[0].flavour, built[0].shiny, built[0].rank) == (7, "sour", True, 4)
    assert runner.invoke(app, ["--flavour", "bitter"]).exit_code == 2


def test_a_setting_with_no_flag_type_or_no_description_fails_when_the_command_is_built():
    class Listed(RunConfig):
        tags: list[str] = Field(default_factory=list, description="No flag type for lists.")

    class Undescribed(RunConfig):
        knob: int = 3

    def command(flags: dict[str, object]) -> None:
        pass

    with pytest.raises(TypeError, match=r"Listed\.tags: no flag for type"):
        config_flags(Listed)(command)
    with pytest.raises(ValueError, match=r"Undescribed\.knob has no description"):
        config_flags(Undescribed)(command)


def test_a_registered_model_is_a_choice(monkeypatch):
    monkeypatch.setitem(MODELS, "toy", dataclasses.replace(MODELS["implicit"], name="toy"))
    app = typer.Typer()
    seen = []

    @app.command()
    @config_flags(RunConfig, names=("model",))
    def run(flags: dict[str, object]) -> None:
        seen.append(flags)

    result = runner.invoke(app, ["--model", "toy"])
    assert result.exit_code == 0, result.output
    assert seen == [{"model": "toy"}]


@pytest.mark.parametrize(
    "args",
    [["--verbose", "run", "--config", "missing.toml"], ["run", "--config", "missing.toml", "-v"]],
    ids=["global", "on-run"],
)
def test_verbose_sets_the_log_level_for_the_run(monkeypatch, args):
    # setenv first, so that monkeypatch removes the variable the command sets again afterwards.
    monkeypatch.setenv("MF_DIST_LOG_LEVEL", "WARNING")
    monkeypatch.delenv("MF_DIST_LOG_LEVEL")
    with pytest.raises(ConfigError, match="config file not found"):
        cli.app(args, standalone_mode=False)
    assert os.environ["MF_DIST_LOG_LEVEL"] == "INFO"


def test_without_verbose_the_log_level_is_left_alone(monkeypatch):
    monkeypatch.setenv("MF_DIST_LOG_LEVEL", "DEBUG")
    with pytest.raises(ConfigError):
        cli.app(["run", "--config", "missing.toml"], standalone_mode=False)
    assert os.environ["MF_DIST_LOG_LEVEL"] == "DEBUG"
