"""What deploy/ hands an operator, checked without the systems it targets.

The deployments file is read the way ``prefect deploy`` and ``mf-dist serve``
read it and every run config in it is validated; the Kubernetes manifests are
checked field by field against the official client's models; the batch
script must parse; the container recipe must install this package as a
non-root user from a CUDA base. Building the image and applying the
manifests need Docker and a cluster and are not done here.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from mf_dist.config import RunConfig
from mf_dist.errors import ConfigError
from mf_dist.flows.serve import (
    checked_parameters,
    load_deployment_specs,
    runner_deployment,
    select_deployments,
)
from tests.support.kubernetes_objects import check_object
from tests.support.paths import REPO

DEPLOY = REPO / "deploy"
ENVIRONMENT = {
    "MF_DIST_INPUT": "/data/ratings",
    "MF_DIST_OUTPUT": "/data/mf-dist",
    "MF_DIST_IMAGE": "registry.example.com/mf-dist:0.1.0",
    "MF_DIST_STORE": "s3://example-bucket/mf-dist",
}


def deployments() -> dict[str, dict]:
    return {spec["name"]: spec for spec in load_deployment_specs(DEPLOY / "prefect.yaml", ENVIRONMENT)}


def manifests(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if doc]


# ------------------------------------------------------------ prefect.yaml


def test_every_deployment_is_a_valid_run_config_with_a_cron_schedule():
    specs = deployments()
    assert {"nightly-cooccurrence", "nightly-ratings-mf", "nightly-cooccurrence-kubernetes"} <= set(specs)
    models = set()
    for spec in specs.values():
        config = RunConfig.model_validate(checked_parameters(spec, "prefect.yaml")["config"])
        models.add(config.model)
        assert spec["entrypoint"] == "mf_dist.flows.pipeline:factorization_pipeline"
        assert [schedule["cron"] for schedule in spec["schedules"]], spec["name"]
        deployment = runner_deployment(spec, "prefect.yaml")
        assert [s.schedule.cron for s in deployment.schedules] == [s["cron"] for s in spec["schedules"]]
    assert {"cooccurrence", "explicit"} <= models


def test_environment_placeholders_are_filled():
    config = deployments()["nightly-ratings-mf"]["parameters"]["config"]
    assert (config["input"], config["output"]) == ("/data/ratings", "/data/mf-dist/ratings-mf")
    kubernetes = deployments()["nightly-cooccurrence-kubernetes"]
    assert kubernetes["work_pool"]["job_variables"]["image"] == ENVIRONMENT["MF_DIST_IMAGE"]


def test_single_host_deployments_use_the_process_pool_and_a_local_cluster():
    chosen = select_deployments(list(deployments().values()), None)
    assert {spec["name"] for spec in chosen} == {"nightly-cooccurrence", "nightly-ratings-mf"}
    for spec in chosen:
        assert spec["work_pool"]["name"] == "mf-dist-process"
        assert spec["parameters"]["config"]["cluster"]["kind"] == "local"


def test_serving_reports_what_is_missing():
    specs = load_deployment_specs(DEPLOY / "prefect.yaml", {})
    with pytest.raises(ConfigError, match=r"set the environment variable\(s\) MF_DIST_INPUT, MF_DIST_OUTPUT"):
        checked_parameters(specs[0], "prefect.yaml")
    with pytest.raises(ConfigError, match="no deployment named nightly-svd"):
        select_deployments(specs, ["nightly-svd"])
    broken = {**deployments()["nightly-cooccurrence"]}
    broken["parameters"] = {"config": {**broken["parameters"]["config"], "rank": 0}}
    with pytest.raises(ConfigError, match=r"deployment 'nightly-cooccurrence'.*rank"):
        checked_parameters(broken, "prefect.yaml")


# -------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize(
    "name", ["storage.yaml", "shared-volume.yaml", "flow-rbac.yaml", "prefect-worker.yaml"]
)
def test_kubernetes_manifests_are_valid_objects(name):
    for document in manifests(name):
        check_object(document)
        assert document["metadata"].get("namespace", "mf-dist") == "mf-dist"


def test_the_object_check_catches_mistakes():
    [deployment] = [d for d in manifests("prefect-worker.yaml") if d["kind"] == "Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(AssertionError, match="imagePullPolicyy: not a field of V1Container"):
        check_object(deployment)
    [deployment] = [d for d in manifests("prefect-worker.yaml") if d["kind"] == "Deployment"]
    del deployment["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(ValueError, match="name"):
        check_object(deployment)


def test_names_agree_across_the_kubernetes_files():
    [worker] = [d for d in manifests("prefect-worker.yaml") if d["kind"] == "Deployment"]
    command = worker["spec"]["template"]["spec"]["containers"][0]["command"]
    kubernetes = deployments()["nightly-cooccurrence-kubernetes"]
    assert command[command.index("--pool") + 1] == kubernetes["work_pool"]["name"]
    assert command[command.index("--type") + 1] == "kubernetes"

    [flow_account] = [d for d in manifests("flow-rbac.yaml") if d["kind"] == "ServiceAccount"]
    template = json.loads((DEPLOY / "kubernetes" / "base-job-template.json").read_text())
    variables = template["variables"]["properties"]
    assert (
        kubernetes["work_pool"]["job_variables"]["service_account_name"] == flow_account["metadata"]["name"]
    )
    assert variables["service_account_name"]["default"] == flow_account["metadata"]["name"]

    # The default: everything on the object store, nothing mounted, workers with their own identity.
    config = RunConfig.model_validate(kubernetes["parameters"]["config"])
    assert all(
        location.startswith("s3://example-bucket/")
        for location in (config.input, config.output, config.work_location)
    )
    assert variables["volumes"]["default"] == variables["volume_mounts"]["default"] == []
    assert "volumes" not in kubernetes["work_pool"]["job_variables"]
    [worker_account] = [d for d in manifests("storage.yaml") if d["kind"] == "ServiceAccount"]
    assert config.cluster.kubernetes.service_account == worker_account["metadata"]["name"]
    assert config.cluster.kubernetes.data_volume_claim is None
    [standing] = manifests("daskcluster.yaml")
    for role in ("worker", "scheduler"):
        assert standing["spec"][role]["spec"]["serviceAccountName"] == worker_account["metadata"]["name"]
    assert "volumes" not in standing["spec"]["worker"]["spec"]

    # The alternative: one ReadWriteMany claim, mounted at the same path in the flow pod and the workers.
    shared = deployments()["nightly-cooccurrence-shared-volume"]
    [claim] = manifests("shared-volume.yaml")
    cluster = shared["parameters"]["config"]["cluster"]["kubernetes"]
    job = shared["work_pool"]["job_variables"]
    [volume] = job["volumes"]
    [mount] = job["volume_mounts"]
    assert (
        cluster["data_volume_claim"]
        == claim["metadata"]["name"]
        == volume["persistentVolumeClaim"]["claimName"]
    )
    assert cluster["data_mount_path"] == mount["mountPath"] and mount["name"] == volume["name"]
    assert shared["parameters"]["config"]["input"].startswith(cluster["data_mount_path"] + "/")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert job["service_account_name"] == flow_account["metadata"]["name"]

    [role] = [d for d in manifests("flow-rbac.yaml") if d["kind"] == "Role"]
    dask_rule = next(rule for rule in role["rules"] if "kubernetes.dask.org" in rule["apiGroups"])
    assert "daskclusters" in dask_rule["resources"] and {"create", "delete"} <= set(dask_rule["verbs"])


# ------------------------------------------------------- container, SLURM


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_container_recipe_installs_the_package_as_a_non_root_user_on_cuda():
    instructions = dockerfile_instructions()
    args = dict(value.split("=", 1) for kind, value in instructions if kind == "ARG" and "=" in value)
    [base] = [value for kind, value in instructions if kind == "FROM"]
    assert base == "${CUDA_IMAGE}" and args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    users = [value for kind, value in instructions if kind == "USER"]
    assert users and users[-1] not in {"root", "0"}
    assert any(
        kind == "RUN" and "useradd --uid 1000" in value and users[-1] in value for kind, value in instructions
    )
    for kind, value in instructions:
        if kind == "COPY":
            for source in value.split()[:-1]:
                assert (REPO / source).exists(), source
    install = next(value for kind, value in instructions if kind == "RUN" and 'pip install ".[' in value)
    extras = re.search(r'pip install "\.\[([^\]]+)\]"', install)[1].split(",")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) <= set(declared)


def test_slurm_batch_script_parses_and_asks_for_one_gpu_per_worker():
    script = DEPLOY / "slurm" / "mf-dist.sbatch"
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert syntax.returncode == 0, syntax.stderr
    text = script.read_text()
    directives = [
        line.removeprefix("#SBATCH ").strip() for line in text.splitlines() if line.startswith("#SBATCH")
    ]
    assert "--gpus-per-task=1" in directives
    [srun] = re.findall(r"^srun .*?(?<!\\)$", text, flags=re.MULTILINE | re.DOTALL)
    assert "--resources GPU=1" in srun and "--nthreads 1" in srun
    assert Path(script).stat().st_mode & 0o111, "the script should be executable"
