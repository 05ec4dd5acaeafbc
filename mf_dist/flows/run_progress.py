"""A pipeline run's progress in the CLI, read from the flow's run-log records.

This lives with the flows because it reads Prefect's records (their
``task_name``) and adjusts Prefect's console handler; the bars themselves are
:mod:`mf_dist.terminal.progress`'s. Prefect is imported only when a run starts,
so that the CLI starts without it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from mf_dist.terminal.progress import CountColumn, shows_progress


class PipelineProgressHandler(logging.Handler):
    """Turns the flow's run-log records into progress: the stage running now and the epoch bar.

    It reads what the flow already logs (each record's Prefect ``task_name``,
    and the train task's ``"epoch %d: ..."`` records), so neither the flow nor
    the trainers know about progress bars. A record it does not recognise
    changes nothing.
    """

    def __init__(self, progress: Progress, stage_task: TaskID, epoch_task: TaskID) -> None:
        super().__init__(level=logging.INFO)
        self.progress = progress
        self.stage_task = stage_task
        self.epoch_task = epoch_task
        self.stage: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        stage = getattr(record, "task_name", None)
        if isinstance(stage, str) and stage != self.stage:
            self.stage = stage
            self.progress.update(self.stage_task, description=f"stage {stage}")
        epoch = _epoch_of(record)
        if epoch is not None:
            # The clock of the epoch bar starts with training, not with the run.
            self.progress.start_task(self.epoch_task)
            self.progress.update(self.epoch_task, completed=epoch, visible=True)


def _epoch_of(record: logging.LogRecord) -> int | None:
    if getattr(record, "task_name", None) != "train" or not isinstance(record.msg, str):
        return None
    if not record.msg.startswith("epoch ") or not record.args or not isinstance(record.args, tuple):
        return None
    epoch = record.args[0]
    return epoch if isinstance(epoch, int) else None


def _prefect_console_handlers() -> list[logging.Handler]:
    # Prefect installs its console handler on the root logger when its flow
    # machinery is first imported; import it now so the handler exists to adjust.
    import prefect.main  # noqa: F401
    from prefect.logging.handlers import PrefectConsoleHandler

    return [handler for handler in logging.getLogger().handlers if isinstance(handler, PrefectConsoleHandler)]


@contextlib.contextmanager
def pipeline_progress(console: Console, *, epochs: int, quiet: bool) -> Iterator[None]:
    """Progress of a pipeline run in the CLI.

    ``quiet``: Prefect's per-stage log lines are held back (warnings and errors
    still print) and nothing is drawn. On an interactive terminal: a stage
    line and an epoch bar, with Prefect's log lines printed above them. Else
    (a log file, CI): Prefect's log lines as they are, no bar.
    """
    handlers = _prefect_console_handlers()
    if quiet:
        levels = [handler.level for handler in handlers]
        for handler in handlers:
            handler.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for handler, level in zip(handlers, levels, strict=True):
                handler.setLevel(level)
        return
    if not shows_progress(console, quiet):
        yield
        return
    progress = Progress(
        TextColumn("[bold]{task.description:<16}"),
        BarColumn(),
        CountColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    stage_task = progress.add_task("starting", total=None)
    epoch_task = progress.add_task("training", total=epochs, visible=False, start=False, unit="epochs")
    listener = PipelineProgressHandler(progress, stage_task, epoch_task)
    # Prefect's lines go through the progress console, which prints them above the bars.
    consoles = [getattr(handler, "console", None) for handler in handlers]
    for handler in handlers:
        handler.console = progress.console
    prefect_logger = logging.getLogger("prefect")
    prefect_logger.addHandler(listener)
    try:
        with progress:
            yield
            progress.update(stage_task, description="done", total=1, completed=1)
    finally:
        prefect_logger.removeHandler(listener)
        for handler, original in zip(handlers, consoles, strict=True):
            if original is not None:
                handler.console = original
