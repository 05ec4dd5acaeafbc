"""The loss curve of a run as a PNG, for a person to see whether training converged.

Rendered with matplotlib's Agg canvas on a bare :class:`~matplotlib.figure.Figure`
(no ``pyplot``): no display, no global figure registry, safe in worker
threads and Prefect tasks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from mf_dist.storage.factor_files import EpochRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# A loss that falls by more than this factor is drawn on a log axis: on a
# linear one the last epochs, where convergence is judged, would be a flat line.
LOG_SCALE_MIN_RATIO = 10.0


def uses_log_scale(losses: list[float]) -> bool:
    """Whether ``losses`` span a decade or more (all positive), so a log y axis reads better."""
    finite = [loss for loss in losses if math.isfinite(loss)]
    if not finite or min(finite) <= 0:
        return False
    return max(finite) / min(finite) >= LOG_SCALE_MIN_RATIO


def loss_curve_figure(history: list[EpochRecord], title: str) -> Figure:
    """A figure of loss per epoch and, in a second panel, the per-epoch metrics (e.g. train RMSE).

    Raises ``ValueError`` for an empty history: there is nothing to draw and a
    blank picture would look like a result.
    """
    if not history:
        raise ValueError("cannot draw a loss curve without any epoch")
    # Imported here: matplotlib takes most of a second to import, and the
    # CLI and `mf-dist inspect` import this module only for uses_log_scale.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [record.epoch for record in history]
    losses = [record.loss for record in history]
    metric_names = sorted({name for record in history for name in record.metrics})

    figure = Figure(figsize=(7.0, 4.0 if not metric_names else 6.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(2 if metric_names else 1, 1, sharex=True, squeeze=False)[:, 0]

    loss_axes = panels[0]
    loss_axes.plot(epochs, losses, marker="o" if len(history) <= 30 else None, markersize=3, label="loss")
    if uses_log_scale(losses):
        loss_axes.set_yscale("log")
    loss_axes.set_ylabel("loss" + (" (log scale)" if uses_log_scale(losses) else ""))
    loss_axes.set_title(title)
    loss_axes.grid(True, which="both", alpha=0.3)
    final = history[-1]
    loss_axes.annotate(
        f"{final.loss:.4g}",
        xy=(final.epoch, final.loss),
        xytext=(-4, 6),
        textcoords="offset points",
        ha="right",
        fontsize=8,
    )

    if metric_names:
        metric_axes = panels[1]
        for name in metric_names:
            points = [(record.epoch, record.metrics[name]) for record in history if name in record.metrics]
            metric_axes.plot(
                *zip(*points, strict=True), marker="." if len(points) <= 30 else None, label=name
            )
        metric_axes.set_ylabel("metric")
        metric_axes.grid(True, alpha=0.3)
        metric_axes.legend(loc="best", fontsize=8)
    panels[-1].set_xlabel("epoch")
    # Epochs are whole numbers; fractional ticks would suggest otherwise.
    panels[-1].xaxis.get_major_locator().set_params(integer=True)
    return figure


def write_loss_curve_png(history: list[EpochRecord], path: Path, title: str) -> Path:
    """Write the loss curve of ``history`` (epoch on x, loss on y) as a PNG at ``path``; returns ``path``.

    The y axis is logarithmic when the loss spans a decade or more. The parent
    directory must exist.
    """
    path = Path(path)
    figure = loss_curve_figure(history, title)
    figure.savefig(path, format="png")
    return path
