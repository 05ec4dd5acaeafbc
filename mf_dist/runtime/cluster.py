"""Creating or joining the Dask cluster, and the device a worker computes on.

Library functions take a :class:`distributed.Client`; only this module and the
application layer create one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import dask
import torch
from distributed import Client, LocalCluster, Nanny, SpecCluster
from distributed.scheduler import Scheduler

from mf_dist.errors import ConfigError
from mf_dist.runtime.cluster_settings import ClusterSettings
from mf_dist.runtime.log_levels import set_dask_log_level, worker_log_environ

# A Dask scheduler always starts an HTTP server (health, metrics and info
# routes, whatever ``dashboard`` says), on ``dashboard_address`` or else on
# port 8787 of the scheduler's host. Naming a loopback address with port 0
# keeps it off the network and off a well-known port another user's
# cluster may hold; ``dashboard=False`` keeps the Bokeh dashboard off it.
SCHEDULER_HTTP_ADDRESS = "127.0.0.1:0"

# The scheduler of a cluster started here listens on loopback only, without a dashboard.
LOOPBACK_SCHEDULER = {
    "cls": Scheduler,
    "options": {"host": "127.0.0.1", "dashboard": False, "dashboard_address": SCHEDULER_HTTP_ADDRESS},
}


# Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_ = 64 KiB, so that
# freed memory goes back to the OS at once. Setting it also freezes glibc's
# mmap threshold at 128 KiB: every factor block, product and CG buffer is then
# a fresh mmap whose pages fault in again on first touch, which cost a third
# of the time of the ALS and embedding updates (docs/benchmarks.md). Freed
# blocks up to 32 MiB (glibc's largest mmap threshold) stay in the heap for
# reuse instead; a heap still shrinks once 256 MiB at its top are free.
# As with any pre-spawn variable, a value already in the environment wins.
WORKER_ALLOCATOR_ENVIRON = {
    "MALLOC_TRIM_THRESHOLD_": 256 * 1024 * 1024,
    "MALLOC_MMAP_THRESHOLD_": 32 * 1024 * 1024,
}


def worker_environ() -> dict[str, object]:
    """The environment the nannies of clusters started here give their workers before they spawn."""
    return {
        **dask.config.get("distributed.nanny.pre-spawn-environ", {}),
        **WORKER_ALLOCATOR_ENVIRON,
        **worker_log_environ(),
    }


def visible_gpu_count() -> int:
    """GPUs this process can use (0 when torch has no CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextlib.contextmanager
def open_client(
    *,
    workers: int,
    threads_per_worker: int = 1,
    scheduler: str | None = None,
    cluster: ClusterSettings | None = None,
) -> Iterator[Client]:
    """Yield a client of an existing scheduler, a SLURM or Kubernetes cluster, or a new local cluster.

    ``scheduler`` (an address) wins: the workers are whatever that scheduler
    has. Otherwise ``cluster.kind`` decides (see :mod:`mf_dist.runtime.batch_clusters`
    for ``slurm`` and ``kubernetes``), with ``workers`` workers of
    ``threads_per_worker`` threads each. The local cluster runs worker
    processes bound to loopback with an equal share of the memory; when this
    machine has GPUs, there is one worker per GPU instead, pinned to it
    through ``CUDA_VISIBLE_DEVICES`` and advertising the ``GPU`` resource.
    Clusters started here are shut down when the block exits. Dask logs at
    the level :mod:`mf_dist.runtime.log_levels` gives (warnings by default).
    """
    set_dask_log_level()
    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise ConfigError(f"cannot reach Dask scheduler {scheduler!r}: {exc}") from exc
        with client:
            yield client
        return

    kind = cluster.kind if cluster else "local"
    if kind == "slurm":
        from mf_dist.runtime.batch_clusters import open_slurm_client

        with open_slurm_client(cluster.slurm, workers, threads_per_worker) as client:
            yield client
        return
    if kind == "kubernetes":
        from mf_dist.runtime.batch_clusters import open_kubernetes_client

        with open_kubernetes_client(cluster.kubernetes, workers, threads_per_worker) as client:
            yield client
        return

    gpus = visible_gpu_ids()
    # Nannies read their workers' environment when they are created.
    allocator = dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ()})
    if gpus:
        with (
            allocator,
            SpecCluster(
                workers=gpu_worker_specs(gpus, threads_per_worker),
                scheduler=LOOPBACK_SCHEDULER,
            ) as gpu_cluster,
            Client(gpu_cluster) as client,
        ):
            yield client
        return
    with (
        allocator,
        LocalCluster(
            n_workers=workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": SCHEDULER_HTTP_ADDRESS},
        ) as local_cluster,
        Client(local_cluster) as client,
    ):
        yield client


def visible_gpu_ids() -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` entry of each GPU this process may hand to a worker.

    When this process already has a ``CUDA_VISIBLE_DEVICES`` (SLURM, a
    container runtime or the user set it), a worker must get one of *those*
    entries: the n-th visible GPU is not physical GPU n on a node shared with
    other jobs.
    """
    count = visible_gpu_count()
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is not None:
        entries = [entry.strip() for entry in inherited.split(",") if entry.strip()]
        return entries[:count]
    return [str(index) for index in range(count)]


def gpu_worker_specs(gpu_ids: list[str], threads_per_worker: int) -> dict[str, dict]:
    """SpecCluster worker specs: one nanny-managed worker per GPU, on loopback.

    Worker ``gpu-<i>`` sees only ``gpu_ids[i]`` (as its ``cuda:0``) and
    advertises ``GPU=1``, which the training tasks ask for.
    """
    return {
        f"gpu-{index}": {
            "cls": Nanny,
            "options": {
                "nthreads": threads_per_worker,
                "resources": {"GPU": 1},
                "env": {"CUDA_VISIBLE_DEVICES": gpu_id},
                "host": "127.0.0.1",
            },
        }
        for index, gpu_id in enumerate(gpu_ids)
    }


def compute_device(preference: str = "auto") -> torch.device:
    """The torch device for work in this process: the one place that decides it.

    ``auto`` picks the first visible CUDA device when there is one, else the CPU.
    """
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(f"device='cuda' but no GPU is visible to worker pid {os.getpid()}")
        return torch.device("cuda", 0)
    return torch.device("cpu")


def training_resources(client: Client) -> dict[str, float] | None:
    """Task resources for training: ``{"GPU": 1}`` when any worker offers a GPU."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    if any(worker.get("resources", {}).get("GPU") for worker in workers):
        return {"GPU": 1}
    return None
