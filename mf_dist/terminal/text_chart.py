"""A loss curve as a few lines of text, for terminals and logs where no picture can be shown.

Each column is one epoch (or, when there are more epochs than columns, the
epoch at that point), drawn as a bar of Unicode eighth blocks, so a falling
loss reads as a falling skyline::

     1.2e+03 ┤█▅
             ┤██▃▁
     3.1     ┤█████▇▇▆▆▆▅▅▅
             └epoch 0 ... 60
"""

from __future__ import annotations

import math

from mf_dist.terminal.loss_plot import uses_log_scale

EIGHTHS = " ▁▂▃▄▅▆▇█"


def _sample(values: list[float], columns: int) -> list[int]:
    """Indexes of ``values`` for ``columns`` evenly spread columns, first and last included."""
    if len(values) <= columns:
        return list(range(len(values)))
    return [round(column * (len(values) - 1) / (columns - 1)) for column in range(columns)]


def text_chart(epochs: list[int], losses: list[float], *, width: int = 60, height: int = 6) -> list[str]:
    """Lines of a bar chart of ``losses`` against ``epochs`` (log scale when the loss spans a decade).

    Non-finite losses are drawn as empty columns. Returns ``[]`` for no epochs.
    """
    if not losses:
        return []
    indexes = _sample(losses, max(2, width))
    shown = [losses[index] for index in indexes]
    log = uses_log_scale(losses)
    finite = [value for value in shown if math.isfinite(value) and (value > 0 or not log)]
    if not finite:
        return [f"(no finite loss to draw over {len(losses)} epochs)"]

    def scale(value: float) -> float:
        return math.log10(value) if log else value

    low, high = scale(min(finite)), scale(max(finite))
    span = high - low
    levels = []
    for value in shown:
        if not math.isfinite(value) or (log and value <= 0):
            levels.append(0)
        elif span == 0:
            levels.append(height * 8 // 2)
        else:
            # The smallest value keeps one eighth, so every epoch leaves a mark.
            levels.append(max(1, round((scale(value) - low) / span * (height * 8 - 1)) + 1))

    # Few epochs get wider bars, so a three-epoch run is not three characters wide.
    repeat = max(1, min(4, width // len(levels)))
    levels = [level for level in levels for _ in range(repeat)]
    labels = {0: f"{max(finite):.3g}"}
    if span > 0:
        labels[height - 1] = f"{min(finite):.3g}"
    label_width = max(len(label) for label in labels.values())
    lines = []
    for row in range(height):
        floor = (height - 1 - row) * 8
        bars = "".join(EIGHTHS[min(8, max(0, level - floor))] for level in levels)
        lines.append(f"{labels.get(row, ''):>{label_width}} ┤{bars}")
    axis = f"epoch {epochs[indexes[0]]}"
    if len(indexes) > 1:
        last = f"{epochs[indexes[-1]]}"
        axis += " " * max(1, len(levels) - len(axis) - len(last)) + last
    lines.append(f"{'':>{label_width}} └{axis}" + ("  (log scale)" if log else ""))
    return lines
