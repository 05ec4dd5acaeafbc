"""``mf-dist bench quality``: held-out quality of every model against the tools people compare us with.

The ratings (MovieLens 100K by default) are split into k folds with a fixed
seed (:func:`mf_dist.bench.quality_data.k_folds`); every side
(:mod:`mf_dist.bench.quality_sides`) fits each fold's training part and is
scored on its held-out part by :mod:`mf_dist.stages.scoring`:

- ``explicit``: RMSE of the held-out ratings;
- ``implicit`` (user × item scores) and ``item-knn`` (item vectors used item
  to item): recall@10 and NDCG@10 of each user's held-out likes (rating ≥ 4),
  the user's training items excluded.

A reference runs at its library defaults, and again at the best point of a
small grid (:data:`~mf_dist.bench.quality_sides.SURPRISE_SVD_GRID` and its
siblings, the defaults included) chosen on an inner split of fold 0's training
part only, so the chosen configuration is then scored on ratings it was not
chosen on. Ours runs at the run configuration's defaults, untuned.

Each row reports the mean over folds ± the sample standard deviation over
folds (the JSON also has each fold's value and the standard error, std/√k).
"""

from __future__ import annotations

import math
import platform
import shutil
import tempfile
import time
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field
from rich.console import Console
from rich.table import Table

from mf_dist.bench.quality_data import LIKE_THRESHOLD, MOVIELENS_100K, Fold, inner_fold, k_folds, read_ratings
from mf_dist.bench.quality_sides import Config, Fitted, Resources, Side, all_sides
from mf_dist.errors import ConfigError
from mf_dist.stages.scoring import ranking_metrics, rating_rmse

K = 10
METRICS = {
    "explicit": ("rmse",),
    "implicit": (f"recall@{K}", f"ndcg@{K}"),
    "item-knn": (f"recall@{K}", f"ndcg@{K}"),
}
HEADLINE = {"explicit": "rmse", "implicit": f"recall@{K}", "item-knn": f"recall@{K}"}
RECORD_COMMAND = "mf-dist bench quality --json tests/bench/quality_recorded.json"
"""Re-records the figures tests/bench/test_quality.py re-checks (after a change of defaults)."""


class QualityRow(BaseModel):
    """One row: a side at one configuration, each metric per fold (fold order), and fit seconds per fold."""

    side: str
    task: str
    kind: str
    choice: str = Field(description="'defaults', or 'best of grid' (chosen on fold 0's inner split).")
    config: str = ""
    metrics: dict[str, list[float]] = Field(default_factory=dict)
    seconds: list[float] = Field(default_factory=list)
    grid: list[dict[str, object]] = Field(
        default_factory=list, description="Each grid point and its inner score."
    )
    unavailable: str | None = None
    failed: str | None = None

    def mean(self, metric: str) -> float:
        return float(np.mean(self.metrics[metric]))

    def std(self, metric: str) -> float:
        """The sample standard deviation over folds (0 for a single fold)."""
        values = self.metrics[metric]
        return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    def standard_error(self, metric: str) -> float:
        return self.std(metric) / math.sqrt(len(self.metrics[metric]))


class QualityReport(BaseModel):
    """Everything one ``mf-dist bench quality`` measured, with the data, split and machine."""

    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    machine: str = Field(default_factory=lambda: f"{platform.node()} {platform.machine()}")
    python: str = Field(default_factory=platform.python_version)
    versions: dict[str, str] = Field(default_factory=dict)
    data: str
    n_ratings: int
    n_users: int
    n_items: int
    folds: int
    seed: int
    like_threshold: float = LIKE_THRESHOLD
    k: int = K
    workers: int
    spread: str = "std over folds (ddof 1)"
    wall_seconds: float = 0.0
    rows: list[QualityRow] = Field(default_factory=list)


def score(task: str, fold: Fold, fitted: Fitted) -> dict[str, float]:
    """The fold's metrics of one fit, by the one scoring function of its task."""
    if task == "explicit":
        assert fitted.predicted is not None
        return {"rmse": rating_rmse(fitted.predicted, fold.test["rating"].to_numpy())}
    assert fitted.scores is not None
    ranked = ranking_metrics(fitted.scores, fold.train_seen, fold.test_likes, K)
    return {f"recall@{K}": ranked.mean_recall, f"ndcg@{K}": ranked.mean_ndcg}


def _better(task: str, a: float, b: float) -> bool:
    return a < b if task == "explicit" else a > b


def choose_from_grid(side: Side, fold: Fold, resources: Resources, seed: int) -> tuple[Config, list[dict]]:
    """The best of the side's defaults and grid on an inner split of ``fold``'s training part."""
    inner = inner_fold(fold, seed)
    headline = HEADLINE[side.task]
    tried: list[dict[str, object]] = []
    best: tuple[float, Config] | None = None
    for config in (side.default, *side.grid):
        value = score(side.task, inner, side.fit(inner, config, resources))[headline]
        tried.append({"config": config, f"inner {headline}": value})
        if best is None or _better(side.task, value, best[0]):
            best = (value, config)
    assert best is not None
    return best[1], tried


def run_row(
    side: Side, choice: str, config: Config, folds: Sequence[Fold], resources: Resources
) -> QualityRow:
    """Fit and score ``side`` at ``config`` on every fold."""
    row = QualityRow(side=side.name, task=side.task, kind=side.kind, choice=choice)
    row.metrics = {metric: [] for metric in METRICS[side.task]}
    for fold in folds:
        fitted = side.fit(fold, config, resources)
        for metric, value in score(side.task, fold, fitted).items():
            row.metrics[metric].append(value)
        row.seconds.append(fitted.seconds)
        row.config = fitted.config
    return row


def select_sides(names: Sequence[str] | None) -> list[Side]:
    """All sides, or those named (ConfigError naming an unknown one)."""
    sides = all_sides()
    if not names:
        return sides
    known = {side.name: side for side in sides}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"--sides: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return [side for side in sides if side.name in names]


def run_quality(
    data: Path | None,
    folds: int,
    seed: int,
    sides: Sequence[str] | None,
    workers: int,
    versions: dict[str, str],
    console: Console,
    grids: bool = True,
) -> QualityReport | None:
    """Run the selected sides on every fold; None (after one line) when there is no data to run on."""
    if data is None:
        if not MOVIELENS_100K.exists():
            console.print(
                f"quality bench unavailable: no --data given and MovieLens 100K is not at {MOVIELENS_100K}"
            )
            return None
        data = MOVIELENS_100K
    selected = select_sides(sides)
    ratings = read_ratings(data)
    split = k_folds(ratings, folds, seed)
    report = QualityReport(
        versions=versions,
        data=str(data),
        n_ratings=len(ratings),
        n_users=ratings["user_id"].nunique(),
        n_items=ratings["item_id"].nunique(),
        folds=folds,
        seed=seed,
        workers=workers,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mf-dist-quality-") as scratch:
        resources = Resources(workers=workers, scratch=Path(scratch))
        try:
            if any(side.kind == "ours" for side in selected):
                _start_client(resources)
            for side in selected:
                report.rows += _side_rows(side, split, resources, seed, grids, console)
        finally:
            for close in reversed(resources._closers):
                close()
            shutil.rmtree(scratch, ignore_errors=True)
    report.wall_seconds = time.perf_counter() - started
    return report


def _start_client(resources: Resources) -> None:
    from mf_dist.runtime.cluster import open_client

    opened = open_client(workers=resources.workers)
    resources.client = opened.__enter__()
    resources._closers.append(lambda: opened.__exit__(None, None, None))


def _side_rows(
    side: Side, folds: Sequence[Fold], resources: Resources, seed: int, grids: bool, console: Console
) -> list[QualityRow]:
    reason = side.unavailable()
    if reason:
        return [
            QualityRow(side=side.name, task=side.task, kind=side.kind, choice="defaults", unavailable=reason)
        ]
    rows = []
    try:
        with console.status(f"{side.name}: defaults, {len(folds)} folds"):
            rows.append(run_row(side, "defaults", side.default, folds, resources))
        if side.grid and grids:
            with console.status(f"{side.name}: choosing from a grid of {len(side.grid) + 1}"):
                chosen, tried = choose_from_grid(side, folds[0], resources, seed + 1)
            if chosen == side.default:
                best = rows[0].model_copy(deep=True)
                best.choice = "best of grid (= defaults)"
            else:
                with console.status(f"{side.name}: best of grid, {len(folds)} folds"):
                    best = run_row(side, "best of grid", chosen, folds, resources)
            best.grid = tried
            rows.append(best)
    except Exception as exc:  # one side's failure must not lose the others' figures
        failed = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-3)}"
        rows.append(
            QualityRow(side=side.name, task=side.task, kind=side.kind, choice="defaults", failed=failed)
        )
    return rows


def _figure(row: QualityRow, metric: str) -> str:
    if metric not in row.metrics or not row.metrics[metric]:
        return ""
    return f"{row.mean(metric):.4f} ± {row.std(metric):.4f}"


def print_quality(report: QualityReport, console: Console) -> None:
    """The table: side, kind, configuration, each metric's mean ± std over folds, fit seconds per fold."""
    table = Table(
        title=(
            f"mf-dist bench quality: {Path(report.data).name}, {report.n_ratings:,} ratings, "
            f"{report.folds} folds (seed {report.seed}), mean ± std over folds"
        )
    )
    for column in ("task", "side", "kind", "config", "RMSE", f"recall@{K}", f"NDCG@{K}", "fit s/fold"):
        table.add_column(
            column,
            justify="right" if column in ("RMSE", f"recall@{K}", f"NDCG@{K}", "fit s/fold") else "left",
        )
    for row in report.rows:
        if row.unavailable or row.failed:
            reason = row.unavailable or f"failed: {row.failed.splitlines()[0]}"  # type: ignore[union-attr]
            table.add_row(row.task, row.side, row.kind, reason, "", "", "", "")
            continue
        config = row.config if row.choice == "defaults" else f"{row.choice}: {row.config}"
        table.add_row(
            row.task,
            row.side,
            row.kind,
            config,
            _figure(row, "rmse"),
            _figure(row, f"recall@{K}"),
            _figure(row, f"ndcg@{K}"),
            f"{np.mean(row.seconds):.2f}",
        )
    console.print(table)
    console.print(
        f"{report.machine}, {report.workers} workers, wall {report.wall_seconds:.0f} s; grids chosen on "
        "an inner split of fold 0's training part; ours at the run config's defaults",
        highlight=False,
    )
    for row in report.rows:
        if row.failed:
            console.print(f"[red]{row.side} failed:[/]\n{row.failed}", highlight=False)
