"""The Dask worker plugin that carries a run's storage options to every worker (in memory only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin


class StorageOptionsPlugin(WorkerPlugin):
    """Registers storage options (by store root, ``s3://bucket``) on every Dask worker, present and future.

    The options travel over Dask's connections (to the scheduler, which
    keeps the plugin in memory, and on to the workers); they are never written
    to a file.
    """

    name = "mf-dist-storage-options"

    def __init__(self, options: Mapping[str, Mapping[str, Any]]) -> None:
        self.options = {root: dict(values) for root, values in options.items()}

    def setup(self, worker: Any) -> None:
        from mf_dist.storage import store

        store._OPTIONS.update(self.options)

    def teardown(self, worker: Any) -> None:
        from mf_dist.storage import store

        for root in self.options:
            store._OPTIONS.pop(root, None)
