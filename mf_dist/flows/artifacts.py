"""What a person looks at after a run, as Prefect artifacts: the loss per epoch and its curve.

Artifact keys are stable per model (``mf-dist-<model>-loss``,
``mf-dist-<model>-loss-curve``), so the Prefect UI shows each nightly run's
artifact as a new version of the same one.
"""

from __future__ import annotations

import base64
import math
import tempfile
from pathlib import Path
from uuid import UUID

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from mf_dist.storage.factor_files import EpochRecord
from mf_dist.storage.store import join, write_bytes
from mf_dist.terminal.loss_plot import write_loss_curve_png

REPORTS_DIR = "reports"


def loss_table(history: list[EpochRecord]) -> list[dict[str, float | int | None]]:
    """One row per epoch: epoch, loss, each metric, seconds (JSON-safe: NaN/inf become None).

    ``seconds`` is the manifest's: time since training started, cumulative,
    so the last row's is the training time.
    """
    metric_names = sorted({name for record in history for name in record.metrics})

    def finite(value: float) -> float | None:
        return value if math.isfinite(value) else None

    return [
        {
            "epoch": record.epoch,
            "loss": finite(record.loss),
            **{
                name: finite(record.metrics[name]) if name in record.metrics else None
                for name in metric_names
            },
            "seconds": round(record.seconds, 3),
        }
        for record in history
    ]


def publish_loss_artifacts(
    history: list[EpochRecord], model: str, run_id: str, work_dir: str | Path
) -> tuple[UUID, UUID, str]:
    """Create the loss table and loss-curve artifacts of one run; returns their ids and the PNG's location.

    The PNG is written to ``<work>/reports/loss-<run_id>.png`` and embedded
    in the markdown artifact as a ``data:`` URI, so the UI shows it without
    access to the work directory.
    """
    table_id = create_table_artifact(
        table=loss_table(history),
        key=f"mf-dist-{model}-loss",
        description=f"Loss per epoch of run {run_id} ({model} model)",
    )
    png = join(str(work_dir), REPORTS_DIR, f"loss-{run_id}.png")
    with tempfile.TemporaryDirectory() as scratch:
        # The plotting library writes a local file; the work directory may be a URL.
        drawn = write_loss_curve_png(history, Path(scratch) / "loss.png", title=f"{model} · run {run_id}")
        picture = drawn.read_bytes()
    write_bytes(png, picture)
    encoded = base64.b64encode(picture).decode("ascii")
    final = history[-1]
    markdown = (
        f"### Loss curve, run `{run_id}`\n\n"
        f"![loss per epoch](data:image/png;base64,{encoded})\n\n"
        f"{len(history)} epochs in {final.seconds:.1f} s; final loss {final.loss:.6g}"
        + "".join(f", {name} {value:.4g}" for name, value in sorted(final.metrics.items()))
        + f".\n\nPNG: `{png}`\n"
    )
    curve_id = create_markdown_artifact(
        markdown=markdown,
        key=f"mf-dist-{model}-loss-curve",
        description=f"Loss curve of run {run_id} ({model} model)",
    )
    return table_id, curve_id, png
