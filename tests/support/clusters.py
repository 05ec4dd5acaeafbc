"""Real local Dask clusters of worker processes, started as mf-dist starts them."""

from __future__ import annotations

import dask
from distributed import Client, LocalCluster

from mf_dist.runtime.cluster import SCHEDULER_HTTP_ADDRESS, worker_environ


def start_client(workers: int) -> tuple[LocalCluster, Client]:
    """A local cluster as :func:`mf_dist.runtime.cluster.open_client` starts one."""
    with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ()}):
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": SCHEDULER_HTTP_ADDRESS},
        )
    return cluster, Client(cluster)
