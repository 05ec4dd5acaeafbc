"""Scheduled runs end to end against a real Prefect server process.

A ``prefect server start`` process on a free loopback port with its own
SQLite database and PREFECT_HOME in a temporary directory; the deployments of
deploy/prefect.yaml are registered by ``prefect deploy`` (work pool) or by
``mf-dist serve`` (no work pool), triggered through the API with
``run_deployment`` and executed by a real ``prefect worker`` or the serving
process. The published tables are then read back. Every process started
here is killed with its process group when the test ends, also on failure.

For speed the runs override a few settings of the deployment (epochs, rank,
workers, block size) through the run's parameters; input and output come
from the deployment as registered.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.support.kubernetes_objects import check_object
from tests.support.paths import REPO
from tests.support.processes import BIN, SLURM_STANDIN, ProcessGroup, free_port, process_group, wait_until

# Every test here starts real server and worker processes.
pytestmark = pytest.mark.slow

PREFECT = BIN / "prefect"
MF_DIST = [sys.executable, "-m", "mf_dist.cli"]
FAST = {"epochs": 2, "rank": 4, "block_size": 100, "workers": 2, "retries": 0}


@dataclass
class PrefectServer:
    api_url: str
    env: dict[str, str]
    processes: ProcessGroup

    def cli(self, *args: str | Path, env: dict[str, str] | None = None, timeout: float = 180) -> str:
        """Run a ``prefect`` command against this server; fail with its output."""
        result = subprocess.run(
            [str(PREFECT), *map(str, args)],
            env={**os.environ, **self.env, **(env or {})},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert result.returncode == 0, (
            f"prefect {' '.join(map(str, args))}:\n{result.stdout}\n{result.stderr}"
        )
        return result.stdout


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    root = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {
        "PREFECT_HOME": str(root / "home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "COLUMNS": "200",
    }
    with process_group(root / "logs") as processes:
        processes.start(
            "server",
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            env=env,
        )

        def healthy() -> bool:
            try:
                return httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 180, "the Prefect server answering /api/health", processes)
        server = PrefectServer(env["PREFECT_API_URL"], env, processes)
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server


def read_deployment(name: str):
    async def read():
        async with get_client() as client:
            return await client.read_deployment_by_name(f"mf-dist-pipeline/{name}")

    return asyncio.run(read())


def deployment_exists(name: str) -> bool:
    try:
        read_deployment(name)
    except Exception:
        return False
    return True


def run_with_fast_settings(name: str, timeout: float = 400):
    """Trigger a run of the deployment through the API and wait for its final state."""
    config = read_deployment(name).parameters["config"]
    return run_deployment(
        f"mf-dist-pipeline/{name}",
        parameters={"config": {**config, **FAST}},
        timeout=timeout,
        poll_interval=2,
        as_subflow=False,
    )


def published(output: Path, table: str) -> dict:
    run_id = (output / table / "LATEST").read_text().strip()
    return json.loads((output / table / "runs" / run_id / "_manifest.json").read_text())


def test_deployment_runs_on_a_process_work_pool(prefect_server, tmp_path, tiny_input):
    output = tmp_path / "out"
    environment = {"MF_DIST_INPUT": str(tiny_input), "MF_DIST_OUTPUT": str(output)}
    prefect_server.cli("work-pool", "create", "mf-dist-process", "--type", "process", "--overwrite")
    prefect_server.cli(
        "--no-prompt",
        "deploy",
        "--prefect-file",
        "deploy/prefect.yaml",
        "--name",
        "nightly-cooccurrence",
        env=environment,
    )
    deployment = read_deployment("nightly-cooccurrence")
    assert deployment.parameters["config"]["input"] == str(tiny_input)
    assert deployment.parameters["config"]["output"] == f"{output}/cooccurrence"
    assert [schedule.schedule.cron for schedule in deployment.schedules] == ["0 2 * * *"]
    assert deployment.work_pool_name == "mf-dist-process"

    prefect_server.processes.start(
        "process-worker",
        [PREFECT, "worker", "start", "--pool", "mf-dist-process", "--type", "process"],
        # Poll every 2 s instead of 10: the run is picked up sooner.
        env={**prefect_server.env, "PREFECT_WORKER_QUERY_SECONDS": "2"},
        cwd=tmp_path,
    )
    flow_run = run_with_fast_settings("nightly-cooccurrence")
    assert flow_run.state.is_completed(), (flow_run.state, prefect_server.processes.log_tails())
    manifest = published(output / "cooccurrence", "items")
    assert (manifest["model"], manifest["rank"]) == ("cooccurrence", 4)
    assert len(manifest["loss_history"]) == 3  # epoch 0 and two epochs


def test_served_deployment_runs_without_a_work_pool(prefect_server, tmp_path, tiny_input):
    output = tmp_path / "out"
    prefect_server.processes.start(
        "serve",
        [
            *MF_DIST,
            "serve",
            "--prefect-file",
            REPO / "deploy" / "prefect.yaml",
            "--name",
            "nightly-ratings-mf",
        ],
        env={**prefect_server.env, "MF_DIST_INPUT": str(tiny_input), "MF_DIST_OUTPUT": str(output)},
        cwd=tmp_path,
    )
    wait_until(
        lambda: deployment_exists("nightly-ratings-mf"),
        180,
        "mf-dist serve registering nightly-ratings-mf",
        prefect_server.processes,
    )
    deployment = read_deployment("nightly-ratings-mf")
    assert [schedule.schedule.cron for schedule in deployment.schedules] == ["0 3 * * *"]

    flow_run = run_with_fast_settings("nightly-ratings-mf")
    assert flow_run.state.is_completed(), (flow_run.state, prefect_server.processes.log_tails())
    for table in ("items", "users"):
        manifest = published(output / "ratings-mf", table)
        assert (manifest["model"], manifest["table"]) == ("explicit", table)


SHARED_VOLUME = (
    [{"name": "data", "persistentVolumeClaim": {"claimName": "mf-dist-data"}}],
    [{"name": "data", "mountPath": "/data"}],
)


@pytest.mark.parametrize(
    ("name", "volumes"),
    [
        # The default: input, work and output on an object store, nothing mounted.
        ("nightly-cooccurrence-kubernetes", ([], [])),
        ("nightly-cooccurrence-shared-volume", SHARED_VOLUME),
    ],
)
def test_kubernetes_deployment_renders_a_valid_job(prefect_server, name, volumes):
    """The Kubernetes variants: registered on a kubernetes pool with our job template, rendered, checked."""
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = REPO / "deploy" / "kubernetes" / "base-job-template.json"
    prefect_server.cli(
        "work-pool",
        "create",
        "mf-dist-kubernetes",
        "--type",
        "kubernetes",
        "--base-job-template",
        template,
        "--overwrite",
    )
    image = "registry.example.com/mf-dist:0.1.0"
    prefect_server.cli(
        "--no-prompt",
        "deploy",
        "--prefect-file",
        "deploy/prefect.yaml",
        "--name",
        name,
        env={"MF_DIST_IMAGE": image, "MF_DIST_STORE": "s3://example-bucket/mf-dist"},
    )
    deployment = read_deployment(name)
    # Created, never executed: no worker polls this pool here.
    flow_run = run_deployment(deployment.id, timeout=0, as_subflow=False)

    async def render() -> dict:
        async with get_client() as client:
            pool = await client.read_work_pool("mf-dist-kubernetes")
            configuration = await KubernetesWorkerJobConfiguration.from_template_and_values(
                pool.base_job_template, deployment.job_variables, client=client
            )
            configuration.prepare_for_flow_run(flow_run, deployment=deployment, work_pool=pool)
            return configuration.job_manifest

    job = asyncio.run(render())
    # Unknown fields fail here: Prefect's default template puts completions and
    # parallelism in the pod spec, where Kubernetes drops them; ours has them in the Job's.
    check_object(job)
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (1, 1)
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == image
    assert pod["serviceAccountName"] == "mf-dist-flow"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["volumes"], container["volumeMounts"]) == volumes
    assert job["metadata"]["namespace"] == "mf-dist"
    assert {"name": "PREFECT__FLOW_RUN_ID", "value": str(flow_run.id)} in container["env"]


def test_slurm_batch_script_runs_scheduler_workers_and_flow(prefect_server, tmp_path, tiny_input):
    """deploy/slurm/mf-dist.sbatch, executed with an ``srun`` stand-in (one task per "GPU", here 2)."""
    output = tmp_path / "out"
    config = tmp_path / "run.toml"
    config.write_text(
        f'input = "{tiny_input}"\noutput = "{output}"\nmodel = "cooccurrence"\n'
        "rank = 4\nepochs = 2\nblock_size = 100\nretries = 0\n"
    )
    env = {
        **prefect_server.env,
        "PATH": f"{SLURM_STANDIN}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "2",
        "MF_DIST_VENV": str(Path(sys.executable).parent.parent),
        "MF_DIST_INTERFACE": "lo",
        "MF_DIST_RUN_DIR": str(tmp_path / "job"),
    }
    with process_group(tmp_path / "logs") as processes:
        job = processes.start(
            "sbatch-job", ["bash", REPO / "deploy" / "slurm" / "mf-dist.sbatch", config], env=env
        )
        try:
            job.wait(timeout=400)
        except subprocess.TimeoutExpired:
            pytest.fail("the batch script did not finish" + processes.log_tails())
        assert job.returncode == 0, processes.log_tails()
    log = (tmp_path / "logs" / "sbatch-job.log").read_text()
    assert "with 2 workers" in log
    manifest = published(output, "items")
    assert manifest["model"] == "cooccurrence"
    workers_log = (tmp_path / "job" / "workers.log").read_text()
    assert workers_log.count("Registered to:") == 2
