"""What a suite measured, as pydantic models, and the table ``mf-dist bench`` prints."""

from __future__ import annotations

import math
import platform
from datetime import UTC, datetime

from pydantic import BaseModel, Field
from rich.console import Console
from rich.table import Table

MEBIBYTE = 1024 * 1024


class SideResult(BaseModel):
    """One side of a comparison (ours or the reference), measured in its own process tree.

    ``seconds`` is the timed part only (data already generated and loaded, the
    cluster already started); ``seconds_per_iteration`` divides it by
    ``iterations`` where the work is iterative. Peaks cover the whole side,
    loading included: the largest single process and the sum over the tree.
    """

    implementation: str
    seconds: float
    iterations: int = 1
    threads: int = 0
    """The cores it was given: our worker processes × threads each, or the reference's threads (0: not
    recorded). Both sides get the same, except where a reference has no threads to give (scipy)."""
    peak_process_bytes: int
    peak_total_bytes: int
    quality_name: str
    quality: float
    details: dict[str, float | int | str] = Field(default_factory=dict)

    @property
    def seconds_per_iteration(self) -> float:
        return self.seconds / max(1, self.iterations)


class SuiteResult(BaseModel):
    """One row of the benchmark table: a suite at one scale, ours against the reference."""

    suite: str
    scale: str
    device: str
    target: str
    ours: SideResult | None = None
    reference: SideResult | None = None
    unavailable: str | None = Field(None, description="Why the suite (or its reference) did not run.")
    failed: str | None = Field(None, description="The error of a side that ran and failed.")

    @property
    def ratio(self) -> float | None:
        """Our time per iteration over the reference's (below 1: we are faster)."""
        if self.ours is None or self.reference is None or self.reference.seconds_per_iteration <= 0:
            return None
        return self.ours.seconds_per_iteration / self.reference.seconds_per_iteration


class BenchReport(BaseModel):
    """Everything one ``mf-dist bench`` command measured, with where it ran."""

    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    machine: str = Field(default_factory=lambda: f"{platform.node()} {platform.machine()}")
    python: str = Field(default_factory=platform.python_version)
    versions: dict[str, str] = Field(default_factory=dict)
    suites: list[SuiteResult] = Field(default_factory=list)


def _mib(value: int) -> str:
    return f"{value / MEBIBYTE:,.0f}"


def _quality(side: SideResult) -> str:
    return f"{side.quality:.6g}" if math.isfinite(side.quality) else "n/a"


def print_report(report: BenchReport, console: Console) -> None:
    """The table: time per iteration of each side, their ratio, peak memory and quality; targets below."""
    table = Table(title=f"mf-dist bench ({report.machine}, {report.created})")
    for column in (
        "suite",
        "scale",
        "ours s/it",
        "ref s/it",
        "ours/ref",
        "threads ours / ref",
        "ours peak MiB proc / tree",
        "ref peak MiB proc / tree",
        "quality",
        "ours",
        "ref",
    ):
        table.add_column(column, justify="left" if column in ("suite", "scale", "quality") else "right")
    for result in report.suites:
        ours, reference = result.ours, result.reference
        if ours is None:
            table.add_row(result.suite, result.scale, "–", "–", "", "", "", "", "", "", "")
            continue
        table.add_row(
            result.suite,
            result.scale,
            f"{ours.seconds_per_iteration:.3g}",
            f"{reference.seconds_per_iteration:.3g}" if reference else "–",
            f"{result.ratio:.2f}" if result.ratio is not None else "",
            f"{ours.threads} / {reference.threads}" if reference else f"{ours.threads}",
            f"{_mib(ours.peak_process_bytes)} / {_mib(ours.peak_total_bytes)}",
            f"{_mib(reference.peak_process_bytes)} / {_mib(reference.peak_total_bytes)}" if reference else "",
            ours.quality_name,
            _quality(ours),
            _quality(reference) if reference else "",
        )
    console.print(table)
    for result in report.suites:
        console.print(f"target {result.suite}: {result.target}", highlight=False)
