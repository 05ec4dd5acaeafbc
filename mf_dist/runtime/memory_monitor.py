"""Peak memory of this process and its children (the local Dask workers) while a stage runs."""

from __future__ import annotations

import threading
import time
from types import TracebackType

import psutil


class PeakMemoryMonitor:
    """Samples the resident set size of this process tree every ``interval`` seconds.

    Use as a context manager; afterwards ``peak_process_bytes`` is the largest
    RSS any single process reached and ``peak_total_bytes`` the largest sum.
    Workers of a remote cluster are not children and are not counted.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak_process_bytes = 0
        self.peak_total_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory-monitor", daemon=True)

    def _sample(self) -> None:
        root = psutil.Process()
        sizes = []
        for process in [root, *root.children(recursive=True)]:
            try:
                sizes.append(process.memory_info().rss)
            except psutil.Error:
                continue
        self.peak_process_bytes = max(self.peak_process_bytes, max(sizes, default=0))
        self.peak_total_bytes = max(self.peak_total_bytes, sum(sizes))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemoryMonitor:
        self._sample()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
