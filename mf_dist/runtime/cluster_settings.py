"""Where the Dask workers of a run come from: the ``[cluster]`` table of the run config.

``kind = "local"`` (the default) starts worker processes on this machine;
``slurm`` submits one batch job per worker through dask-jobqueue;
``kubernetes`` asks the Dask operator for a ``DaskCluster`` through
dask-kubernetes. The number of workers is the run's ``workers`` setting in
every case, and a GPU worker always drives exactly one GPU::

    workers = 4

    [cluster]
    kind = "slurm"

    [cluster.slurm]
    queue = "gpu"
    account = "recsys"
    walltime = "04:00:00"
    cores = 8
    memory = "64GB"
    gpus_per_worker = 1

Only the table of the chosen kind is used; the others keep their defaults.
Unknown keys are rejected like everywhere else in the config.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def default_worker_count() -> int:
    """Workers of a local cluster when none are asked for: one per core, at most 8."""
    return max(1, min(os.cpu_count() or 1, 8))


ClusterKind = Literal["local", "slurm", "kubernetes"]

# Kubernetes object names are DNS-1035 labels; the operator appends
# "-scheduler" / "-default-worker-…", so leave room for those suffixes.
KUBERNETES_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")

# One GPU per worker: the trainers compute on one device per process
# (``cuda:0`` of what the worker sees), so a second GPU in a worker would idle.
# Ask for more workers instead.
GpuCount = Annotated[
    int,
    Field(
        ge=0,
        le=1,
        description="GPUs per worker: 0 (CPU-only) or 1 (one GPU, advertised as the GPU resource).",
    ),
]


class SlurmSettings(BaseModel):
    """One SLURM batch job per Dask worker, submitted by dask-jobqueue's ``SLURMCluster``.

    The scheduler runs inside the process that runs the flow (a login node or
    the Prefect worker's job); the workers must be able to reach it on
    ``interface`` (e.g. ``ib0``) and must see the same work and output
    directories (a shared filesystem).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    queue: str | None = Field(None, description="Partition (#SBATCH -p).")
    account: str | None = Field(None, description="Account to charge (#SBATCH -A).")
    walltime: str = Field("04:00:00", description="Time limit of each worker job (#SBATCH -t).")
    cores: int = Field(4, ge=1, le=1024, description="CPU cores of each worker job (--cpus-per-task).")
    memory: str = Field("32GB", description="Memory of each worker job; also the worker's memory limit.")
    gpus_per_worker: GpuCount = 0
    gpu_directive: str = Field(
        "--gres=gpu:{gpus}",
        description="How this site asks for GPUs; {gpus} is replaced (e.g. '--gpus={gpus}').",
    )
    interface: str | None = Field(
        None, description="Network interface the scheduler and workers talk on (e.g. ib0, eth0)."
    )
    python: str | None = Field(
        None, description="Python on the compute nodes (default: the one running the flow)."
    )
    job_script_prologue: list[str] = Field(
        default_factory=list,
        description="Shell lines run before the worker starts (module load, source venv/bin/activate).",
    )
    extra_directives: list[str] = Field(
        default_factory=list, description="More #SBATCH options, e.g. '--constraint=a100'."
    )
    log_directory: str | None = Field(None, description="Where the worker jobs' stdout/stderr go.")
    local_directory: str | None = Field(
        None, description="Node-local scratch for spilled data (e.g. $TMPDIR)."
    )
    startup_timeout_seconds: int = Field(
        3600, ge=1, description="How long to wait for every worker job to start (queue time included)."
    )

    @field_validator(
        "queue",
        "account",
        "walltime",
        "memory",
        "gpu_directive",
        "interface",
        "python",
        "extra_directives",
        "log_directory",
        "local_directory",
    )
    @classmethod
    def _one_line(cls, value: str | list[str] | None) -> str | list[str] | None:
        # These land in #SBATCH lines and in the worker's command line of the
        # generated job script: a newline would start a shell command of its
        # own. (job_script_prologue is shell lines by design.)
        for text in [value] if isinstance(value, str) else value or []:
            if any(ord(character) < 32 or ord(character) == 127 for character in text):
                raise ValueError(f"must be one line without control characters (got {text!r})")
        return value

    @field_validator("gpu_directive")
    @classmethod
    def _directive_names_gpus(cls, value: str) -> str:
        if "{gpus}" not in value:
            raise ValueError("must contain {gpus}, e.g. '--gres=gpu:{gpus}'")
        return value


class KubernetesSettings(BaseModel):
    """A ``DaskCluster`` resource for the Dask Kubernetes operator, one pod per worker.

    The operator must be installed in the cluster (deploy/README.md). With the
    work directory and output on an object store (the default setup), pods
    reach the store with the identity of ``service_account`` (workload
    identity) or credentials in ``env``. The alternative: workers mount
    ``data_volume_claim`` (a ReadWriteMany claim) at ``data_mount_path`` so
    that they, and the pod that runs the flow, share the work and output
    directories.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("mf-dist", description="Name of the DaskCluster resource.")
    namespace: str = Field("default", description="Namespace to create it in.")
    image: str = Field(
        "mf-dist:latest", description="Container image with mf-dist installed (deploy/Dockerfile)."
    )
    cores: int = Field(4, ge=1, le=1024, description="CPU cores requested for each worker pod.")
    memory: str = Field("16Gi", description="Memory request and limit of each worker pod.")
    gpus_per_worker: GpuCount = 0
    scheduler_cores: int = Field(1, ge=1, le=64)
    scheduler_memory: str = Field("4Gi")
    data_volume_claim: str | None = Field(
        None, description="PersistentVolumeClaim holding the work and output directories."
    )
    data_mount_path: str = Field("/data", description="Where the claim is mounted in every pod.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment of every pod.")
    service_account: str | None = Field(
        None,
        description=(
            "Service account of the scheduler and worker pods: the one bound to the object store's "
            "workload identity (IRSA on EKS, Workload Identity on GKE or AKS)."
        ),
    )
    startup_timeout_seconds: int = Field(
        900, ge=1, description="How long to wait for the scheduler and every worker pod."
    )

    @field_validator("name")
    @classmethod
    def _name_is_a_dns_label(cls, value: str) -> str:
        if not KUBERNETES_NAME.fullmatch(value):
            raise ValueError("must be lowercase letters, digits and '-', start with a letter, at most 40")
        return value


class ClusterSettings(BaseModel):
    """Which kind of cluster a run uses, and the settings of each kind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ClusterKind = Field("local", description="local, slurm or kubernetes.")
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
