"""Progress bars for long CLI work: shown on a terminal, silent with ``--quiet`` and in logs.

A bar redrawn many times a second is noise in a log file or a CI transcript,
so nothing is drawn unless the console is an interactive terminal.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

BlockCallback = Callable[[int, int], None]


class RateColumn(ProgressColumn):
    """Completed units per second, e.g. ``12.5 blocks/s``."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(
            f"{speed:.3g} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed"
        )


def shows_progress(console: Console, quiet: bool) -> bool:
    """Whether to draw bars: not asked to be quiet, and writing to an interactive terminal."""
    return not quiet and console.is_terminal and not console.is_dumb_terminal


@contextlib.contextmanager
def count_progress(
    console: Console, description: str, unit: str, *, quiet: bool
) -> Iterator[BlockCallback | None]:
    """Yield a ``(done, total)`` callback that drives one bar, or None when no bar is shown."""
    if not shows_progress(console, quiet):
        yield None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield advance
