"""A scheduler plugin that records where each task ran and which resources it asked for.

Loaded into a ``dask scheduler`` process started by a test (the repository
is on its ``PYTHONPATH``), so placement can be checked after the fact.
"""

from __future__ import annotations

from typing import Any

from dask.utils import key_split
from distributed.diagnostics.plugin import SchedulerPlugin

PLUGIN_NAME = "mf-dist-placement"


class PlacementRecorder(SchedulerPlugin):
    """Keeps (task prefix, worker address, resource restrictions) of every finished task."""

    name = PLUGIN_NAME

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, float]]] = []

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def transition(
        self, key: Any, start: str, finish: str, *args: Any, stimulus_id: str, **kwargs: Any
    ) -> None:
        if start == "processing" and finish == "memory":
            task = self.scheduler.tasks.get(key)
            restrictions = dict(task.resource_restrictions or {}) if task is not None else {}
            self.records.append((key_split(key), kwargs.get("worker", ""), restrictions))


def placement_records(dask_scheduler: Any) -> list[tuple[str, str, dict[str, float]]]:
    """For ``client.run_on_scheduler``: what the recorder has seen."""
    return dask_scheduler.plugins[PLUGIN_NAME].records
