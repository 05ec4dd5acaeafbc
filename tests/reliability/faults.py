"""Real faults, placed where a test wants them: Dask workers that SIGKILL themselves mid-stage.

:class:`KillWorkerOnTask` is a worker plugin. For each function it is given,
every worker counts the tasks of that function it starts; the first worker
to start its n-th sends itself ``SIGKILL``, the way the kernel's OOM killer
would end it: no exception, no clean-up, its in-memory results gone. A
marker file per function (created with ``O_EXCL``) makes each kill happen
once, also on the workers the nannies start in the dead ones' place, and
records which process died.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

from dask.utils import key_split
from distributed.diagnostics.plugin import WorkerPlugin

PLUGIN_NAME = "mf-dist-kill-worker-on-task"


def marker_path(directory: str | Path, function: str) -> Path:
    return Path(directory) / f"{function}.killed"


class KillWorkerOnTask(WorkerPlugin):
    """SIGKILL the worker that first starts its n-th task of a function, once per function.

    ``triggers`` maps function names (task key prefixes) to n; the markers
    go to ``marker_dir``.
    """

    name = PLUGIN_NAME

    def __init__(self, triggers: dict[str, int], marker_dir: str) -> None:
        self.triggers = triggers
        self.marker_dir = marker_dir
        self.started: Counter[str] = Counter()

    def setup(self, worker: Any) -> None:
        self.started = Counter()

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        function = key_split(key)
        if finish != "executing" or function not in self.triggers:
            return
        self.started[function] += 1
        if self.started[function] < self.triggers[function]:
            return
        try:
            descriptor = os.open(marker_path(self.marker_dir, function), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(descriptor, f"{os.getpid()} {key}\n".encode())
        os.close(descriptor)
        os.kill(os.getpid(), signal.SIGKILL)


def killed_worker(marker_dir: Path, function: str) -> tuple[int, str] | None:
    """(pid, task key) of the worker killed on ``function``, or None if none was."""
    marker = marker_path(marker_dir, function)
    if not marker.exists():
        return None
    pid, key = marker.read_text().split(maxsplit=1)
    return int(pid), key.strip()
