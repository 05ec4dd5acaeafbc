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
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

BlockCallback = Callable[[int, int], None]


class CountColumn(ProgressColumn):
    """``done/total unit, rate unit/s`` for tasks that count something (a ``unit`` field), else blank."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit")
        if unit is None:
            return Text("")
        total = "?" if task.total is None else f"{task.total:.0f}"
        speed = task.finished_speed or task.speed
        rate = f", {speed:.3g} {unit}/s" if speed else ""
        return Text(f"{task.completed:.0f}/{total} {unit}{rate}", style="progress.download")


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
        CountColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=None, unit=unit)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield advance
