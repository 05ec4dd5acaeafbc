"""The ``mf-dist`` command: run, demo, generate.

Errors of mf-dist's own types are printed as one line and exit with status 2;
nothing else is caught.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from mf_dist.bench import command as bench_command
from mf_dist.commands import ann as ann_command
from mf_dist.commands import fold_in as fold_in_command
from mf_dist.commands import inspect as inspect_commands
from mf_dist.commands import neighbors as neighbors_command
from mf_dist.commands import recommend as recommend_command
from mf_dist.config import RunConfig, load_config
from mf_dist.config_flags import config_flags
from mf_dist.errors import MfDistError
from mf_dist.flows.run_progress import pipeline_progress
from mf_dist.runtime.log_levels import LOG_LEVEL_VARIABLE
from mf_dist.settings import TrainingOptions
from mf_dist.storage.input_files import check_schemas, list_input_files
from mf_dist.storage.output_lock import exclusive_run

if TYPE_CHECKING:
    from mf_dist.flows.pipeline import PipelineSummary

# The temporary Prefect server would try to send telemetry on every start.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect gives its temporary server 20 s to answer; on a busy 2-core machine
# its start (imports, database check) took longer and the run failed before
# it began. Waiting longer costs nothing when it starts fast.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

app = typer.Typer(
    name="mf-dist",
    help="Distributed matrix factorization: Parquet ratings in, embedding tables out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
errors = Console(stderr=True)

ConfigOption = Annotated[
    Optional[Path], typer.Option("--config", help="TOML file with run settings; flags override it.")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or per-stage log lines.")]
VerboseOption = Annotated[
    bool,
    typer.Option(
        "--verbose", "-v", help=f"Dask's logs at INFO, not WARNING (sets {LOG_LEVEL_VARIABLE}=INFO)."
    ),
]


def _flag_panel(name: str) -> str:
    # The 40-odd settings read more easily in two groups.
    return "Training" if name in TrainingOptions.model_fields else "Data, cluster and pipeline"


def _log_verbosely(verbose: bool) -> None:
    """With ``--verbose``, set ``MF_DIST_LOG_LEVEL=INFO``; without it, leave the environment's value.

    Called first thing in a command, before Prefect, Dask or a worker
    starts: whatever reads the variable then sees it, here and in the
    processes started from here, which inherit the environment.
    """
    if verbose:
        os.environ[LOG_LEVEL_VARIABLE] = "INFO"


@app.callback()
def global_options(verbose: VerboseOption = False) -> None:
    """Options of every command (before its name: ``mf-dist --verbose run ...``)."""
    _log_verbosely(verbose)


def _run(config: RunConfig) -> PipelineSummary:
    # Reading the footers takes milliseconds; a wrong path or column, an
    # unwritable output or one another run is writing should not wait for a
    # Prefect server and a cluster to start. (The flow takes the lock again
    # for the whole run.)
    check_schemas(
        list_input_files(config.input, config.storage_options),
        user_col=config.user_col,
        item_col=config.item_col,
        rating_col=config.rating_col,
        timestamp_col=config.timestamp_col,
        storage_options=config.storage_options,
    )
    with exclusive_run(
        config.output,
        config.work_location,
        purpose="checking the output",
        storage_options=config.storage_options,
    ):
        pass
    from mf_dist.flows.pipeline import factorization_pipeline

    return factorization_pipeline(config)


@app.command()
@config_flags(RunConfig, panel=_flag_panel)
def run(
    flags: dict[str, Any],
    config: ConfigOption = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Run the pipeline on your own Parquet ratings.

    Every setting of the run configuration is a flag; flags override the --config file.
    """
    _log_verbosely(verbose)
    settings = load_config(config, **flags)
    started = time.perf_counter()
    with pipeline_progress(console, epochs=settings.resolved_epochs, quiet=quiet):
        summary = _run(settings)
    print_summary(summary, time.perf_counter() - started)


@app.command()
@config_flags(RunConfig, names=("model", "rank", "epochs", "workers"))
def demo(
    flags: dict[str, Any],
    output: Annotated[Path, typer.Option(help="Directory for the generated input and the tables.")] = Path(
        "mf-dist-demo"
    ),
    ratings: Annotated[int, typer.Option(help="Number of ratings to generate.")] = 1_000_000,
    seed: Annotated[int, typer.Option(help="Random seed (data and training).")] = 0,
    neighbors: Annotated[int, typer.Option(help="Top-N similar items per item (0: skip).")] = 10,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Generate a realistic ratings set and run the whole pipeline on it."""
    _log_verbosely(verbose)
    from mf_dist.bench.synthetic import synthetic_ratings, write_partitions

    input_dir = output / f"input-{ratings}-seed{seed}"
    if not input_dir.exists():
        with console.status(f"generating {ratings:,} ratings into {input_dir}"):
            partial = input_dir.with_name(input_dir.name + ".partial")
            write_partitions(synthetic_ratings(ratings, seed=seed), partial)
            partial.rename(input_dir)
    console.print(f"input: {input_dir}")
    settings = load_config(
        None, input=str(input_dir), output=str(output / "tables"), seed=seed, neighbors=neighbors, **flags
    )
    started = time.perf_counter()
    with pipeline_progress(console, epochs=settings.resolved_epochs, quiet=quiet):
        summary = _run(settings)
    print_summary(summary, time.perf_counter() - started)


@app.command()
def generate(
    output: Annotated[Path, typer.Argument(help="Directory to write Parquet partitions into.")],
    ratings: Annotated[int, typer.Option(help="Number of ratings.")] = 1_000_000,
    users: Annotated[Optional[int], typer.Option(help="Number of users.")] = None,
    items: Annotated[Optional[int], typer.Option(help="Number of items.")] = None,
    files: Annotated[int, typer.Option(help="Number of Parquet files.")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a synthetic ratings set (heavy-tailed, low-rank) as Parquet partitions."""
    from mf_dist.bench.synthetic import synthetic_ratings, write_partitions

    frame = synthetic_ratings(ratings, n_users=users, n_items=items, seed=seed)
    write_partitions(frame, output, files)
    console.print(
        f"wrote {len(frame):,} ratings ({frame.user_id.nunique():,} users, "
        f"{frame.item_id.nunique():,} items) to {output}"
    )


@app.command()
def serve(
    prefect_file: Annotated[Path, typer.Option(help="Deployment file with schedules and parameters.")] = Path(
        "deploy/prefect.yaml"
    ),
    name: Annotated[
        Optional[list[str]],
        typer.Option("--name", help="Deployment to serve (repeatable); default: those tagged single-host."),
    ] = None,
) -> None:
    """Serve the scheduled deployments from this process, for users with no work pool.

    Needs a Prefect server (PREFECT_API_URL); runs until interrupted.
    """
    from mf_dist.flows.serve import serve_deployments

    serve_deployments(prefect_file, name, os.environ)


app.command(name="neighbors")(neighbors_command.neighbors)
app.command(name="recommend")(recommend_command.recommend)
app.command(name="fold-in")(fold_in_command.fold_in)
app.command(name="ann")(ann_command.ann)
app.command(name="inspect")(inspect_commands.inspect_run)
app.command(name="similar")(inspect_commands.similar)
app.command(name="bench")(bench_command.bench)


def print_summary(summary: PipelineSummary, wall_seconds: float) -> None:
    """The end-of-run summary: tables, sizes, loss and per-stage cost."""
    overview = Table(title=f"mf-dist run {summary.run_id}", show_header=False)
    overview.add_row(
        "model", f"{summary.model}, rank {summary.rank}, {summary.epochs} epochs, {summary.device}"
    )
    overview.add_row(
        "data",
        f"{summary.n_ratings:,} ratings, {summary.n_likes:,} likes, "
        f"{summary.n_users:,} users, {summary.n_items:,} items",
    )
    overview.add_row(
        "final loss",
        f"{summary.final_loss:.6g}"
        + "".join(f", {name} {value:.4g}" for name, value in summary.final_metrics.items()),
    )
    if summary.evaluation:
        overview.add_row(
            "held out",
            ", ".join(f"{name.removeprefix('holdout_')} {v:.4g}" for name, v in summary.evaluation.items()),
        )
    for table in summary.export.tables:
        overview.add_row(f"table {table.name}", f"{table.rows:,} rows → {table.path}")
    if summary.neighbors is not None:
        neighbors = summary.neighbors
        overview.add_row(
            "table neighbors",
            f"top {neighbors.k} by {neighbors.metric}, {neighbors.rows:,} rows → {neighbors.path}",
        )
    if summary.recommendations is not None:
        recommendations = summary.recommendations
        overview.add_row(
            "table recommendations",
            f"top {recommendations.n} per user (seen {recommendations.seen}), "
            f"{recommendations.rows:,} rows → {recommendations.path}",
        )
    if summary.ann is not None:
        overview.add_row(
            "table ann", f"{summary.ann.kind} index of {summary.ann.items:,} items → {summary.ann.path}"
        )
    if summary.export.tables:
        from mf_dist.stages.export import LOSS_CURVE_FILE
        from mf_dist.storage.filesystems import join

        # join, not Path: the tables may be on an object store (s3://...).
        overview.add_row("loss curve", join(summary.export.tables[0].path, LOSS_CURVE_FILE))
    console.print(overview)

    stages = Table(title="stages")
    for column in ("stage", "wall s", "peak MiB / process", "peak MiB / all"):
        stages.add_column(column, justify="right" if column != "stage" else "left")
    for stage in summary.stages:
        stages.add_row(
            stage.name, f"{stage.seconds:.1f}", f"{stage.peak_process_mib:.0f}", f"{stage.peak_total_mib:.0f}"
        )
    stages.add_row("total (with start-up)", f"{wall_seconds:.1f}", "", "")
    console.print(stages)


def main() -> None:
    """Console entry point: our errors become one line and exit status 2."""
    try:
        app()
    except MfDistError as exc:
        # The temporary Prefect server stops at exit and says so; our line stays the last one.
        logging.getLogger("prefect").setLevel(logging.WARNING)
        errors.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
