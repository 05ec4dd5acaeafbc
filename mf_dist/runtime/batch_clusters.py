"""Dask clusters on SLURM (dask-jobqueue) and Kubernetes (dask-kubernetes), from the run config.

The settings become plain keyword arguments or a plain ``DaskCluster``
document first (:func:`slurm_job_options`, :func:`kubernetes_cluster_spec`);
only :func:`open_slurm_client` and :func:`open_kubernetes_client` import the
optional packages (``pip install mf-dist[slurm]`` / ``mf-dist[kubernetes]``)
and talk to the batch system. That split lets the job script and the cluster
document be generated and checked on a machine with neither.

In both, a GPU worker drives exactly one GPU: SLURM's ``--gres``/``--gpus``
and Kubernetes' device plugin set ``CUDA_VISIBLE_DEVICES`` for the job or
container, and the worker advertises ``GPU=1`` so that training tasks, which
ask for that resource, land on it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from distributed import Client

from mf_dist.errors import ConfigError
from mf_dist.runtime.cluster_settings import KubernetesSettings, SlurmSettings

SCHEDULER_PORT = 8786
SCHEDULER_DASHBOARD_PORT = 8787
WORKER_DASHBOARD_PORT = 8788

# The scheduler SLURMCluster starts in the flow's process. No dashboard: nobody
# asked for a web server on the submit host. The scheduler still serves health
# and metrics over HTTP (by default on :8787, every interface): keep that on
# loopback, on a free port. Its Dask port follows ``interface`` (the workers'
# network).
SLURM_SCHEDULER_OPTIONS = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}


def _missing_extra(extra: str, exc: ImportError) -> ConfigError:
    return ConfigError(
        f"cluster.kind = {extra!r} needs the {extra} extra: pip install 'mf-dist[{extra}]' ({exc})"
    )


def slurm_job_options(settings: SlurmSettings, threads_per_worker: int) -> dict[str, Any]:
    """Keyword arguments of ``SLURMCluster`` (and ``SLURMJob``): one worker process per job.

    ``cores`` is the worker's thread count; the job asks SLURM for
    ``settings.cores`` CPUs (``job_cpu``) so that torch's own threads have
    room. ``memory`` is both the job's ``--mem`` and the worker's memory limit.
    """
    gpu_directives = (
        [settings.gpu_directive.format(gpus=settings.gpus_per_worker)] if settings.gpus_per_worker else []
    )
    worker_args = ["--resources", f"GPU={settings.gpus_per_worker}"] if settings.gpus_per_worker else []
    return {
        "queue": settings.queue,
        "account": settings.account,
        "walltime": settings.walltime,
        "cores": threads_per_worker,
        "job_cpu": settings.cores,
        "memory": settings.memory,
        "processes": 1,
        "interface": settings.interface,
        "python": settings.python,
        "job_name": "mf-dist-worker",
        "job_extra_directives": gpu_directives + list(settings.extra_directives),
        "worker_extra_args": worker_args,
        "job_script_prologue": list(settings.job_script_prologue),
        "log_directory": settings.log_directory,
        "local_directory": settings.local_directory,
    }


def slurm_job_script(settings: SlurmSettings, threads_per_worker: int, scheduler_address: str) -> str:
    """The batch script ``SLURMCluster`` submits for one worker that joins ``scheduler_address``."""
    try:
        from dask_jobqueue.slurm import SLURMJob
    except ImportError as exc:
        raise _missing_extra("slurm", exc) from exc
    job = SLURMJob(
        scheduler_address, name="mf-dist-worker", **slurm_job_options(settings, threads_per_worker)
    )
    return job.job_script()


@contextlib.contextmanager
def open_slurm_client(settings: SlurmSettings, workers: int, threads_per_worker: int) -> Iterator[Client]:
    """Start a scheduler here, submit ``workers`` worker jobs, and yield a client once all have joined.

    The jobs are cancelled (``scancel``) when the block exits, also on error.
    Raises :class:`ConfigError` when the jobs do not all start within
    ``settings.startup_timeout_seconds``.
    """
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise _missing_extra("slurm", exc) from exc
    with (
        SLURMCluster(
            scheduler_options=SLURM_SCHEDULER_OPTIONS,
            **slurm_job_options(settings, threads_per_worker),
        ) as cluster,
        Client(cluster) as client,
    ):
        cluster.scale(jobs=workers)
        _wait_for_workers(client, workers, settings.startup_timeout_seconds, "SLURM worker jobs")
        yield client


def kubernetes_cluster_spec(settings: KubernetesSettings, workers: int, threads_per_worker: int) -> dict:
    """A ``DaskCluster`` document (kubernetes.dask.org/v1) for the Dask operator.

    Scheduler and workers run ``dask scheduler`` / ``dask worker`` from
    ``settings.image``; workers ask for ``settings.cores`` CPUs,
    ``settings.memory`` and, with ``gpus_per_worker = 1``, one
    ``nvidia.com/gpu``. The worker's memory limit is read by Dask from the
    container's cgroup. Pods run as a non-root user.
    """
    labels = {"app.kubernetes.io/name": "mf-dist", "app.kubernetes.io/component": "dask"}
    env = [{"name": name, "value": value} for name, value in sorted(settings.env.items())]
    volumes, mounts = [], []
    if settings.data_volume_claim:
        volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": settings.data_volume_claim}}]
        mounts = [{"name": "data", "mountPath": settings.data_mount_path}]
    pod_security = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000}
    # Workers read and write the object store with this account's workload identity.
    identity = {"serviceAccountName": settings.service_account} if settings.service_account else {}

    worker_limits: dict[str, str] = {"memory": settings.memory}
    worker_args = [
        "dask",
        "worker",
        # The operator injects DASK_SCHEDULER_ADDRESS, which ``dask worker`` reads, and the pod's name.
        "--name",
        "$(DASK_WORKER_NAME)",
        "--nthreads",
        str(threads_per_worker),
        "--dashboard-address",
        str(WORKER_DASHBOARD_PORT),
    ]
    if settings.gpus_per_worker:
        worker_limits["nvidia.com/gpu"] = str(settings.gpus_per_worker)
        worker_args += ["--resources", f"GPU={settings.gpus_per_worker}"]
    worker_container = {
        "name": "worker",
        "image": settings.image,
        "args": worker_args,
        "env": env,
        "resources": {
            "requests": {"cpu": str(settings.cores), "memory": settings.memory},
            "limits": worker_limits,
        },
        "ports": [{"name": "http-dashboard", "containerPort": WORKER_DASHBOARD_PORT, "protocol": "TCP"}],
        "volumeMounts": mounts,
    }
    health_probe = {"httpGet": {"port": "http-dashboard", "path": "/health"}}
    scheduler_container = {
        "name": "scheduler",
        "image": settings.image,
        # Inside the pod the scheduler listens on every interface; only the
        # ClusterIP service below exposes it, and only within the cluster.
        "args": ["dask", "scheduler", "--host", "0.0.0.0", "--port", str(SCHEDULER_PORT)],
        "env": env,
        "resources": {
            "requests": {"cpu": str(settings.scheduler_cores), "memory": settings.scheduler_memory},
            "limits": {"memory": settings.scheduler_memory},
        },
        "ports": [
            {"name": "tcp-comm", "containerPort": SCHEDULER_PORT, "protocol": "TCP"},
            {"name": "http-dashboard", "containerPort": SCHEDULER_DASHBOARD_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            **health_probe,
            "initialDelaySeconds": 0,
            "periodSeconds": 1,
            "timeoutSeconds": 300,
        },
        "livenessProbe": {**health_probe, "initialDelaySeconds": 15, "periodSeconds": 20},
    }
    document = {
        "apiVersion": "kubernetes.dask.org/v1",
        "kind": "DaskCluster",
        "metadata": {"name": settings.name, "namespace": settings.namespace, "labels": labels},
        "spec": {
            "idleTimeout": 0,
            "worker": {
                "replicas": workers,
                "spec": {
                    **identity,
                    "securityContext": pod_security,
                    "containers": [worker_container],
                    "volumes": volumes,
                },
            },
            "scheduler": {
                "spec": {**identity, "securityContext": pod_security, "containers": [scheduler_container]},
                "service": {
                    "type": "ClusterIP",
                    "selector": {
                        "dask.org/cluster-name": settings.name,
                        "dask.org/component": "scheduler",
                    },
                    "ports": [
                        {
                            "name": "tcp-comm",
                            "protocol": "TCP",
                            "port": SCHEDULER_PORT,
                            "targetPort": "tcp-comm",
                        },
                        {
                            "name": "http-dashboard",
                            "protocol": "TCP",
                            "port": SCHEDULER_DASHBOARD_PORT,
                            "targetPort": "http-dashboard",
                        },
                    ],
                },
            },
        },
    }
    # Scheduler and worker share a few sub-documents above; callers may edit one of them.
    return json.loads(json.dumps(document))


@contextlib.contextmanager
def open_kubernetes_client(
    settings: KubernetesSettings, workers: int, threads_per_worker: int
) -> Iterator[Client]:
    """Create the ``DaskCluster`` through the operator, yield a client once every worker joined.

    Needs credentials for the cluster (in-cluster service account or
    kubeconfig) that may create ``daskclusters`` in ``settings.namespace``;
    the resource is deleted when the block exits, also on error.
    """
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError as exc:
        raise _missing_extra("kubernetes", exc) from exc
    with (
        KubeCluster(
            custom_cluster_spec=kubernetes_cluster_spec(settings, workers, threads_per_worker),
            namespace=settings.namespace,
            shutdown_on_close=True,
            resource_timeout=settings.startup_timeout_seconds,
            quiet=True,
        ) as cluster,
        Client(cluster) as client,
    ):
        _wait_for_workers(client, workers, settings.startup_timeout_seconds, "Kubernetes worker pods")
        yield client


def _wait_for_workers(client: Client, workers: int, timeout_seconds: int, what: str) -> None:
    try:
        client.wait_for_workers(workers, timeout=timeout_seconds)
    except TimeoutError as exc:
        joined = len(client.scheduler_info(n_workers=-1)["workers"])
        raise ConfigError(
            f"only {joined} of {workers} {what} joined within {timeout_seconds} s; "
            "check the queue or the pods, or raise startup_timeout_seconds"
        ) from exc
