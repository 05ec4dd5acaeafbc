"""Creating or joining the Dask cluster, and the device a worker computes on.

Library functions take a :class:`distributed.Client`; only this module and the
application layer create one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from distributed import Client, LocalCluster

from mf_dist.errors import ConfigError


def visible_gpu_count() -> int:
    """GPUs this process can use (0 when torch has no CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextlib.contextmanager
def open_client(
    *,
    workers: int,
    threads_per_worker: int = 1,
    scheduler: str | None = None,
) -> Iterator[Client]:
    """Yield a client of an existing scheduler or of a new local cluster.

    The local cluster runs ``workers`` worker processes bound to loopback, each
    with ``threads_per_worker`` threads and an equal share of the memory. When
    this machine has GPUs, there is one worker per GPU, pinned to it through
    ``CUDA_VISIBLE_DEVICES`` and advertising the ``GPU`` resource.
    """
    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise ConfigError(f"cannot reach Dask scheduler {scheduler!r}: {exc}") from exc
        with client:
            yield client
        return

    gpus = visible_gpu_count()
    if gpus:
        with _local_gpu_cluster(gpus, threads_per_worker) as client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@contextlib.contextmanager
def _local_gpu_cluster(gpus: int, threads_per_worker: int) -> Iterator[Client]:
    from distributed import Nanny, SpecCluster
    from distributed.scheduler import Scheduler

    workers = {
        f"gpu-{index}": {
            "cls": Nanny,
            "options": {
                "nthreads": threads_per_worker,
                "resources": {"GPU": 1},
                "env": {"CUDA_VISIBLE_DEVICES": str(index)},
                "host": "127.0.0.1",
            },
        }
        for index in range(gpus)
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": None}}
    with SpecCluster(workers=workers, scheduler=scheduler) as cluster, Client(cluster) as client:
        yield client


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
