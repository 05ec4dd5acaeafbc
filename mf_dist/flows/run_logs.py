"""Our errors end a flow run with their one line; Prefect's engine adds no traceback to them.

Prefect logs the exception that ends a task or flow run with its traceback
(60 lines of its own engine) before the state message. For an
:class:`~mf_dist.errors.MfDistError`, which names the file, column and row to
fix, the traceback says nothing more; the filter drops it and keeps the
record's one line, in the terminal and in the logs sent to the Prefect API.
Any other exception keeps its traceback.
"""

from __future__ import annotations

import logging

from mf_dist.errors import MfDistError

# The loggers of Prefect's flow and task run engines.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class OurErrorsInOneLine(logging.Filter):
    """Drops the traceback of records whose exception is one of ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], MfDistError):
            record.exc_info = None
            record.exc_text = None
        return True


def keep_our_errors_to_one_line() -> None:
    """Install :class:`OurErrorsInOneLine` on Prefect's run loggers (once per process)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, OurErrorsInOneLine) for existing in logger.filters):
            logger.addFilter(OurErrorsInOneLine())
