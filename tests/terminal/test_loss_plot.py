"""The loss-curve PNG: a real image, the right data on the right axes."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from mf_dist.storage.factor_files import EpochRecord
from mf_dist.terminal.loss_plot import loss_curve_figure, uses_log_scale, write_loss_curve_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def history(losses: list[float], **metrics: list[float]) -> list[EpochRecord]:
    return [
        EpochRecord(
            epoch=epoch,
            loss=loss,
            metrics={name: values[epoch] for name, values in metrics.items()},
            seconds=0.1,
        )
        for epoch, loss in enumerate(losses)
    ]


def test_png_is_written_and_readable(tmp_path):
    path = write_loss_curve_png(history([100.0, 10.0, 1.0, 0.5]), tmp_path / "loss_curve.png", "items")
    assert path == tmp_path / "loss_curve.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 600
    # Not a blank canvas: the curve, axes and text leave non-white pixels.
    assert (pixels[..., :3] < 0.5).any()


def test_curve_holds_epochs_and_losses_and_goes_log_when_it_spans_decades():
    losses = [5000.0, 800.0, 90.0, 12.0, 3.0]
    figure = loss_curve_figure(history(losses), "cooccurrence rank 4")
    axes = figure.axes[0]
    x, y = axes.lines[0].get_data()
    np.testing.assert_array_equal(x, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(y, losses)
    assert axes.get_yscale() == "log"
    assert axes.get_title() == "cooccurrence rank 4"
    assert figure.axes[-1].get_xlabel() == "epoch"


def test_flat_loss_stays_linear_and_metrics_get_their_own_panel():
    figure = loss_curve_figure(history([1.2, 1.0, 0.9], train_rmse=[1.1, 0.95, 0.9]), "explicit")
    loss_axes, metric_axes = figure.axes[:2]
    assert loss_axes.get_yscale() == "linear"
    np.testing.assert_array_equal(metric_axes.lines[0].get_data()[1], [1.1, 0.95, 0.9])
    assert metric_axes.lines[0].get_label() == "train_rmse"


@pytest.mark.parametrize(
    ("losses", "expected"),
    [([10.0, 1.0], True), ([9.0, 1.0], False), ([1.0, 0.0], False), ([1.0, float("nan"), 0.01], True)],
)
def test_log_scale_rule(losses, expected):
    assert uses_log_scale(losses) is expected


def test_empty_history_is_refused(tmp_path):
    with pytest.raises(ValueError, match="without any epoch"):
        write_loss_curve_png([], tmp_path / "x.png", "nothing")
