"""How much Dask says: warnings and errors only, unless ``MF_DIST_LOG_LEVEL`` asks for more.

Dask's scheduler and nannies log every client connection at INFO (a dozen
lines per stage); a user running the pipeline wants the stage lines and the
summary. ``mf-dist --verbose`` sets ``MF_DIST_LOG_LEVEL=INFO``; a deployment
sets the variable in its job's environment.
"""

from __future__ import annotations

import logging
import os

from mf_dist.errors import ConfigError

LOG_LEVEL_VARIABLE = "MF_DIST_LOG_LEVEL"
DEFAULT_DASK_LEVEL = "WARNING"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Loggers whose records are Dask's own bookkeeping; `distributed` is the parent
# of the scheduler's, the nanny's and the workers' loggers.
DASK_LOGGERS = ("distributed",)


def dask_log_level() -> str:
    """The level of Dask's loggers: ``MF_DIST_LOG_LEVEL`` when set, else WARNING."""
    level = os.environ.get(LOG_LEVEL_VARIABLE, DEFAULT_DASK_LEVEL).strip().upper()
    if level not in LEVELS:
        raise ConfigError(
            f"{LOG_LEVEL_VARIABLE}={os.environ[LOG_LEVEL_VARIABLE]!r} is not a log level; "
            f"choose one of {', '.join(LEVELS)}"
        )
    return level


def set_dask_log_level() -> str:
    """Apply :func:`dask_log_level` to Dask's loggers in this process; returns the level."""
    level = dask_log_level()
    for name in DASK_LOGGERS:
        logging.getLogger(name).setLevel(level)
    return level


def worker_log_environ() -> dict[str, str]:
    """Environment that gives worker processes the same level (Dask reads it when it starts)."""
    return {"DASK_LOGGING__DISTRIBUTED": dask_log_level().lower()}
