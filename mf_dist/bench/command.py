"""The ``mf-dist bench`` command: run suites, print the table, optionally write JSON."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

from mf_dist.bench.measure import SideContext, SideFailedError, run_side_process
from mf_dist.bench.results import BenchReport, SuiteResult, print_report
from mf_dist.bench.scales import SCALES, SUITE_NAMES, ScaleName
from mf_dist.errors import ConfigError
from mf_dist.settings import DeviceName

if TYPE_CHECKING:
    from mf_dist.bench.suites import Suite, Variant

VERSIONED_PACKAGES = (
    "numpy",
    "scipy",
    "torch",
    "dask",
    "distributed",
    "scikit-learn",
    "implicit",
    "pyspark",
    "scikit-surprise",
)
QUALITY = "quality"
"""The suite argument that runs :mod:`mf_dist.bench.quality` (held-out quality on real ratings) instead."""
QUALITY_PANEL = "bench quality"

# Piped into a file or CI log, rich would wrap the ten-column table at 80 characters.
console = Console(width=None if Console().is_terminal else 200)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def _variant_label(variant: Variant) -> str:
    return ", ".join(f"{'k' if key == 'rank' else key}={value}" for key, value in variant.items())


def run_suite(suite: Suite, scale_name: str, device: str, workers: int, cache_dir: Path) -> list[SuiteResult]:
    """Prepare the suite's data once, then run ours and the reference for each variant."""
    scale = SCALES[scale_name]
    reason = suite.reference_unavailable()
    ours_reason = suite.ours_unavailable()
    results = []
    for variant in suite.variants:
        label = suite.name + (f" ({_variant_label(variant)})" if variant else "")
        target = suite.variant_target(variant) or suite.target
        result = SuiteResult(suite=label, scale=scale_name, device=device, target=target)
        if ours_reason:
            # Without our side there is nothing to compare.
            results.append(result.model_copy(update={"unavailable": ours_reason}))
            continue
        with console.status(f"{label}: preparing {scale_name} data"):
            input_dir, work_dir = suite.prepare(cache_dir, scale, workers, variant)
        context = SideContext(
            suite=suite.name,
            variant=variant,
            scale=scale_name,
            device=device,
            workers=workers,
            cache_dir=str(cache_dir),
            input_dir=str(input_dir),
            work_dir=str(work_dir),
        )
        scratch = cache_dir / scale_name / "sides"
        # A variant too large for the reference (by arithmetic) still runs ours, and says why.
        variant_reason = reason or suite.variant_reference_unavailable(variant)
        problems = []
        with console.status(f"{label}: ours"):
            try:
                result.ours = run_side_process(context, "ours", scratch)
            except SideFailedError as exc:
                problems.append(str(exc))
        if suite.reference is not None and variant_reason is None:
            with console.status(f"{label}: reference"):
                try:
                    result.reference = run_side_process(context, "reference", scratch)
                except SideFailedError as exc:
                    problems.append(str(exc))
        elif variant_reason:
            result.unavailable = variant_reason
        if problems:
            result.failed = "\n".join(problems)
        results.append(result)
    return results


def bench(
    suite: Annotated[
        Optional[str],
        typer.Argument(
            help=(
                f"One of: {', '.join(SUITE_NAMES)} (default: all of them); or {QUALITY}: k-fold held-out "
                "quality of every model against Surprise, Spark and implicit on real ratings."
            )
        ),
    ] = None,
    scale: Annotated[ScaleName, typer.Option(help="tiny (seconds), small (minutes), ml20m.")] = "tiny",
    device: Annotated[DeviceName, typer.Option(help="Where our side computes: cpu or cuda.")] = "cpu",
    json: Annotated[Optional[Path], typer.Option("--json", help="Also write the results here.")] = None,
    workers: Annotated[int, typer.Option(help="Local Dask worker processes for our side.")] = 2,
    cache_dir: Annotated[
        Optional[Path], typer.Option(help="Where generated data is kept between runs (default: a temp dir).")
    ] = None,
    data: Annotated[
        Optional[Path],
        typer.Option(
            help="Ratings file, Parquet or TSV (user, item, rating); default: ../shared/data/ml-100k.tsv.",
            rich_help_panel=QUALITY_PANEL,
        ),
    ] = None,
    folds: Annotated[int, typer.Option(help="Folds of the k-fold split.", rich_help_panel=QUALITY_PANEL)] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the split.", rich_help_panel=QUALITY_PANEL)] = 0,
    sides: Annotated[
        Optional[str],
        typer.Option(
            help="Comma-separated sides to run (e.g. explicit/als,surprise-svd,popularity); default: all.",
            rich_help_panel=QUALITY_PANEL,
        ),
    ] = None,
    grids: Annotated[
        bool,
        typer.Option(
            help="Also run each reference at the best of its grid (chosen on an inner split of fold 0).",
            rich_help_panel=QUALITY_PANEL,
        ),
    ] = True,
) -> None:
    """Time our stages against reference implementations on generated data, with quality and memory.

    `mf-dist bench quality` instead scores every model's held-out quality on real ratings, k-fold,
    against the libraries people compare it with (docs/benchmarks.md).
    """
    if suite == QUALITY:
        _quality(data, folds, seed, sides, workers, json, grids)
        return
    if suite is not None and suite not in SUITE_NAMES:
        raise ConfigError(
            f"unknown bench suite {suite!r}; choose one of {', '.join(SUITE_NAMES)} or {QUALITY}"
        )
    # The suites import torch, Dask and scipy: seconds that every other
    # command, and `mf-dist --help`, should not pay.
    from mf_dist.bench.suites import SUITES
    from mf_dist.runtime.cluster import compute_device

    if device == "cuda":
        # Raises a ConfigError naming the process when no GPU is visible.
        compute_device("cuda")
    selected = [SUITES[suite]] if suite else list(SUITES.values())
    report = BenchReport(versions=_versions())
    with tempfile.TemporaryDirectory(prefix="mf-dist-bench-") as temporary:
        root = cache_dir or Path(temporary)
        for chosen in selected:
            report.suites += run_suite(chosen, scale, device, workers, root)
    print_report(report, console)
    for result in report.suites:
        if result.unavailable:
            console.print(f"[yellow]{result.suite}: {result.unavailable}[/]")
        if result.failed:
            console.print(f"[red]{result.suite} failed:[/]\n{result.failed}", highlight=False)
    if json is not None:
        json.write_text(report.model_dump_json(indent=2))
        console.print(f"results written to {json}")
    if any(result.failed for result in report.suites):
        raise typer.Exit(1)


def _quality(
    data: Path | None, folds: int, seed: int, sides: str | None, workers: int, json: Path | None, grids: bool
) -> None:
    from mf_dist.bench.quality import print_quality, run_quality

    names = [name.strip() for name in sides.split(",") if name.strip()] if sides else None
    report = run_quality(data, folds, seed, names, workers, _versions(), console, grids=grids)
    if report is None:
        return
    print_quality(report, console)
    if json is not None:
        json.write_text(report.model_dump_json(indent=2) + "\n")
        console.print(f"results written to {json}")
    if any(row.failed for row in report.rows):
        raise typer.Exit(1)
