"""SLURM and Kubernetes clusters from the config, checked as far as this machine allows.

There is no SLURM controller and no Kubernetes API server here. What runs:

* the batch script that dask-jobqueue's ``SLURMCluster`` submits is generated
  and read back (directives, worker command, GPU resource), passes
  ``bash -n``, and is *executed* through a stand-in ``sbatch``
  (tests/support/slurm_standin) that runs it on this machine: its workers join the
  flow's scheduler and the pipeline completes;
* the ``DaskCluster`` document is generated and validated against the
  DaskCluster CRD schema shipped with dask-kubernetes, with unknown fields
  rejected (the API server would silently prune them).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import psutil
import pytest
import yaml

from mf_dist.config import load_config
from mf_dist.flows.pipeline import factorization_pipeline
from mf_dist.runtime.batch_clusters import (
    SLURM_SCHEDULER_OPTIONS,
    kubernetes_cluster_spec,
    slurm_job_options,
    slurm_job_script,
)
from mf_dist.runtime.cluster_settings import KubernetesSettings, SlurmSettings
from tests.support.paths import REPO
from tests.support.processes import SLURM_STANDIN

DASK_CLUSTER_CRD = "operator/deployment/helm/dask-kubernetes-operator/crds/daskcluster.yaml"

GPU_SLURM = SlurmSettings(
    queue="gpu",
    account="recsys",
    walltime="02:30:00",
    cores=8,
    memory="64GB",
    gpus_per_worker=1,
    interface="ib0",
    job_script_prologue=["module load cuda/12.4", "source /opt/mf-dist/venv/bin/activate"],
    extra_directives=["--constraint=a100"],
)


def directives(script: str) -> list[str]:
    return [
        line.removeprefix("#SBATCH ").strip() for line in script.splitlines() if line.startswith("#SBATCH")
    ]


def worker_command(script: str) -> list[str]:
    [line] = [line for line in script.splitlines() if "distributed.cli.dask_worker" in line]
    return shlex.split(line)


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


# --------------------------------------------------------------------- SLURM


def test_slurm_job_script_asks_for_one_gpu_and_advertises_it():
    script = slurm_job_script(GPU_SLURM, threads_per_worker=1, scheduler_address="tcp://10.1.2.3:8786")
    lines = directives(script)
    assert {"-p gpu", "-A recsys", "-n 1", "--cpus-per-task=8", "-t 02:30:00"} <= set(lines)
    assert "--gres=gpu:1" in lines and "--constraint=a100" in lines
    # 64 GB = 59.6 GiB; SLURM's "G" is GiB, rounded up.
    assert "--mem=60G" in lines
    command = worker_command(script)
    assert command[command.index("-m") + 1 : command.index("-m") + 3] == [
        "distributed.cli.dask_worker",
        "tcp://10.1.2.3:8786",
    ]
    assert option(command, "--nthreads") == "1"
    assert option(command, "--resources") == "GPU=1"
    assert option(command, "--interface") == "ib0"
    assert option(command, "--memory-limit") == "59.60GiB"
    prologue = script.index("module load cuda/12.4")
    assert prologue < script.index("source /opt/mf-dist/venv/bin/activate") < script.index("dask_worker")
    syntax = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True, check=False)
    assert syntax.returncode == 0, syntax.stderr


def test_cpu_only_slurm_workers_ask_for_no_gpu():
    script = slurm_job_script(SlurmSettings(cores=2, memory="8GB"), 2, "tcp://10.1.2.3:8786")
    assert not [line for line in directives(script) if "gpu" in line.lower()]
    command = worker_command(script)
    assert "--resources" not in command
    assert option(command, "--nthreads") == "2"
    assert not [line for line in directives(script) if line.startswith(("-p", "-A"))]


def test_site_specific_gpu_directive():
    settings = GPU_SLURM.model_copy(update={"gpu_directive": "--gpus-per-task={gpus}"})
    assert "--gpus-per-task=1" in directives(slurm_job_script(settings, 1, "tcp://10.1.2.3:8786"))


def test_slurm_cluster_submits_the_same_script():
    """The script SLURMCluster itself would submit, with its real scheduler address."""
    from dask_jobqueue import SLURMCluster

    settings = GPU_SLURM.model_copy(update={"interface": "lo"})
    with SLURMCluster(scheduler_options=SLURM_SCHEDULER_OPTIONS, **slurm_job_options(settings, 1)) as cluster:
        script = cluster.job_script()
        address = cluster.scheduler_address
        http_hosts = {sock.getsockname()[0] for sock in cluster.scheduler.http_server._sockets.values()}
    assert http_hosts == {"127.0.0.1"}, "the scheduler's HTTP server must stay on loopback"
    assert address.startswith("tcp://127.0.0.1:")
    assert directives(script) == directives(slurm_job_script(settings, 1, address))
    assert option(worker_command(script), "--resources") == "GPU=1"
    assert address in worker_command(script)


@pytest.fixture
def slurm_standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``sbatch``/``scancel`` stand-ins first on PATH; kills every job they started at teardown."""
    spool = tmp_path / "slurm"
    spool.mkdir()
    monkeypatch.setenv("PATH", f"{SLURM_STANDIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MF_DIST_SLURM_SPOOL", str(spool))
    try:
        yield spool
    finally:
        for job in submitted_jobs(spool):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job, signal.SIGKILL)


def submitted_jobs(spool: Path) -> list[int]:
    jobs = spool / "jobs"
    return [int(line) for line in jobs.read_text().split()] if jobs.exists() else []


@pytest.mark.slow
def test_pipeline_runs_on_workers_started_by_the_slurm_job_scripts(
    prefect_server, slurm_standin, tmp_path, tiny_input
):
    config_file = tmp_path / "run.toml"
    config_file.write_text(
        f"""
input = "{tiny_input}"
output = "{tmp_path / "out"}"
model = "cooccurrence"
rank = 4
epochs = 2
block_size = 100
workers = 2

[cluster.slurm]
queue = "gpu"
cores = 1
memory = "2GB"
gpus_per_worker = 1
interface = "lo"
python = "{sys.executable}"
startup_timeout_seconds = 120
"""
    )
    summary = factorization_pipeline(load_config(config_file, cluster="slurm"))

    assert (tmp_path / "out" / "items" / "LATEST").read_text().strip() == summary.run_id
    jobs = submitted_jobs(slurm_standin)
    assert len(jobs) == 2
    scripts = sorted(slurm_standin.glob("job-*.sh"))
    assert len(scripts) == 2
    for script in scripts:
        assert "--gres=gpu:1" in directives(script.read_text())
        # The worker that this job script started joined the flow's scheduler.
        assert "Registered to:" in Path(f"{script}.log").read_text()
    # scancel ran when the flow closed its cluster: every job ends.
    alive = []
    for job in jobs:
        with contextlib.suppress(psutil.NoSuchProcess):
            alive.append(psutil.Process(job))
    _, still_running = psutil.wait_procs(alive, timeout=30)
    assert not still_running


# ---------------------------------------------------------------- Kubernetes


@functools.cache
def dask_cluster_crd() -> dict[str, Any]:
    text = (importlib.resources.files("dask_kubernetes") / DASK_CLUSTER_CRD).read_text()
    return yaml.safe_load(text)


def strict(schema: Any) -> Any:
    """An OpenAPI v3 structural schema as JSON Schema that rejects unknown fields.

    The API server prunes fields a structural schema does not declare; for a
    check, an undeclared field is an error (a typo would otherwise vanish).
    """
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    converted = {key: strict(value) for key, value in schema.items()}
    if schema.get("x-kubernetes-int-or-string"):
        converted.pop("type", None)
        converted["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        converted["additionalProperties"] = False
    return converted


@functools.cache
def strict_dask_cluster_validator() -> jsonschema.Draft7Validator:
    [version] = [v for v in dask_cluster_crd()["spec"]["versions"] if v.get("served", True)]
    schema = strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def validate_dask_cluster(document: dict[str, Any]) -> None:
    crd = dask_cluster_crd()
    [version] = [v for v in crd["spec"]["versions"] if v.get("served", True)]
    assert document["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
    assert document["kind"] == crd["spec"]["names"]["kind"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", document["metadata"]["name"])
    body = {key: value for key, value in document.items() if key not in {"apiVersion", "kind", "metadata"}}
    strict_dask_cluster_validator().validate(body)


GPU_KUBERNETES = KubernetesSettings(
    name="mf-dist-nightly",
    namespace="recsys",
    image="registry.example/mf-dist:0.1.0",
    cores=8,
    memory="48Gi",
    gpus_per_worker=1,
    data_volume_claim="mf-dist-data",
    env={"MF_DIST_LOG": "info"},
)


def containers(document: dict[str, Any], role: str) -> dict[str, Any]:
    [container] = document["spec"][role]["spec"]["containers"]
    return container


def test_kubernetes_cluster_spec_is_a_valid_dask_cluster_with_gpu_workers():
    document = kubernetes_cluster_spec(GPU_KUBERNETES, workers=4, threads_per_worker=1)
    validate_dask_cluster(document)

    assert document["metadata"] == {
        "name": "mf-dist-nightly",
        "namespace": "recsys",
        "labels": {"app.kubernetes.io/name": "mf-dist", "app.kubernetes.io/component": "dask"},
    }
    assert document["spec"]["worker"]["replicas"] == 4
    worker = containers(document, "worker")
    assert worker["image"] == "registry.example/mf-dist:0.1.0"
    assert worker["args"][:2] == ["dask", "worker"]
    assert option(worker["args"], "--resources") == "GPU=1"
    assert option(worker["args"], "--nthreads") == "1"
    assert worker["resources"]["limits"] == {"memory": "48Gi", "nvidia.com/gpu": "1"}
    assert worker["resources"]["requests"] == {"cpu": "8", "memory": "48Gi"}
    assert worker["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert {"name": "MF_DIST_LOG", "value": "info"} in worker["env"]
    scheduler = containers(document, "scheduler")
    assert scheduler["args"][:2] == ["dask", "scheduler"]
    assert "nvidia.com/gpu" not in scheduler["resources"]["limits"], "the scheduler needs no GPU"
    assert document["spec"]["scheduler"]["service"]["type"] == "ClusterIP"
    for role in ("worker", "scheduler"):
        assert document["spec"][role]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_cpu_only_kubernetes_workers():
    document = kubernetes_cluster_spec(KubernetesSettings(), workers=2, threads_per_worker=2)
    validate_dask_cluster(document)
    worker = containers(document, "worker")
    assert "--resources" not in worker["args"]
    assert "nvidia.com/gpu" not in worker["resources"]["limits"]
    assert document["spec"]["worker"]["spec"]["volumes"] == []
    assert "serviceAccountName" not in document["spec"]["worker"]["spec"]


def test_object_store_workers_mount_nothing_and_run_as_the_workload_identity():
    settings = KubernetesSettings(service_account="mf-dist-flow", env={"AWS_REGION": "eu-west-1"})
    document = kubernetes_cluster_spec(settings, workers=2, threads_per_worker=1)
    validate_dask_cluster(document)
    for role in ("worker", "scheduler"):
        assert document["spec"][role]["spec"]["serviceAccountName"] == "mf-dist-flow"
        assert {"name": "AWS_REGION", "value": "eu-west-1"} in containers(document, role)["env"]
    assert document["spec"]["worker"]["spec"]["volumes"] == []
    assert containers(document, "worker")["volumeMounts"] == []


def test_the_schema_check_catches_a_misspelt_field():
    document = kubernetes_cluster_spec(GPU_KUBERNETES, workers=1, threads_per_worker=1)
    containers(document, "worker")["resource"] = containers(document, "worker").pop("resources")
    with pytest.raises(jsonschema.ValidationError, match="resource"):
        validate_dask_cluster(document)
    document = kubernetes_cluster_spec(GPU_KUBERNETES, workers=1, threads_per_worker=1)
    document["spec"]["worker"]["replicas"] = "four"
    with pytest.raises(jsonschema.ValidationError, match="four"):
        validate_dask_cluster(document)


def test_deploy_manifest_is_a_valid_dask_cluster_like_the_generated_one():
    [document] = list(yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "daskcluster.yaml").read_text()))
    validate_dask_cluster(document)
    settings = KubernetesSettings(
        name=document["metadata"]["name"],
        namespace=document["metadata"]["namespace"],
        image=containers(document, "worker")["image"],
        cores=int(containers(document, "worker")["resources"]["requests"]["cpu"]),
        memory=containers(document, "worker")["resources"]["requests"]["memory"],
        gpus_per_worker=1,
        data_volume_claim="mf-dist-data",
    )
    generated = kubernetes_cluster_spec(
        settings, document["spec"]["worker"]["replicas"], threads_per_worker=1
    )
    assert containers(document, "worker")["args"] == containers(generated, "worker")["args"]
    assert containers(document, "worker")["resources"] == containers(generated, "worker")["resources"]
    assert containers(document, "scheduler")["args"] == containers(generated, "scheduler")["args"]
