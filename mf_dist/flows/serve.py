"""Serve the deployments of ``deploy/prefect.yaml`` from one process: schedules without a work pool.

``mf-dist serve`` reads the same file ``prefect deploy`` does, so the
schedules and parameters are written once. ``{{ $NAME }}`` placeholders are
filled from the environment, as ``prefect deploy`` fills them; the
``config`` parameter of each deployment is checked as a
:class:`~mf_dist.config.RunConfig` before anything is registered. Without
``names``, the deployments tagged ``single-host`` are served (the ones meant
for this machine, not the Kubernetes ones).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron
from pydantic import ValidationError

from mf_dist.config import RunConfig, describe_validation_error
from mf_dist.errors import ConfigError
from mf_dist.flows.pipeline import factorization_pipeline

SINGLE_HOST_TAG = "single-host"
ENTRYPOINT = "mf_dist.flows.pipeline:factorization_pipeline"
PLACEHOLDER = re.compile(r"{{\s*\$(\w+)\s*}}")


def load_deployment_specs(prefect_file: Path, environ: Mapping[str, str]) -> list[dict[str, Any]]:
    """The ``deployments`` of a prefect.yaml, anchors expanded and ``{{ $NAME }}`` filled from ``environ``.

    Raises :class:`ConfigError` for a missing or unreadable file.
    """
    try:
        document = yaml.safe_load(Path(prefect_file).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"deployment file not found: {prefect_file}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{prefect_file}: not valid YAML: {exc}") from exc
    deployments = (document or {}).get("deployments") or []
    return _fill_placeholders(deployments, environ)


def _fill_placeholders(value: Any, environ: Mapping[str, str]) -> Any:
    # As prefect deploy does: each "{{ $NAME }}" becomes the variable's text; unset ones stay.
    if isinstance(value, dict):
        return {key: _fill_placeholders(item, environ) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill_placeholders(item, environ) for item in value]
    if isinstance(value, str):
        return PLACEHOLDER.sub(lambda match: environ.get(match[1], match[0]), value)
    return value


def select_deployments(specs: list[dict[str, Any]], names: list[str] | None) -> list[dict[str, Any]]:
    """The specs named in ``names``, or those tagged ``single-host`` when ``names`` is empty."""
    if not names:
        chosen = [spec for spec in specs if SINGLE_HOST_TAG in spec.get("tags", [])]
        if not chosen:
            raise ConfigError(f"no deployment is tagged {SINGLE_HOST_TAG!r}; name one with --name")
        return chosen
    by_name = {spec["name"]: spec for spec in specs}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ConfigError(f"no deployment named {', '.join(unknown)}; the file has {', '.join(by_name)}")
    return [by_name[name] for name in names]


def checked_parameters(spec: dict[str, Any], source: str) -> dict[str, Any]:
    """The deployment's parameters after checking ``config`` as a RunConfig (placeholders resolved)."""
    parameters = spec.get("parameters") or {}
    missing = sorted(set(PLACEHOLDER.findall(yaml.safe_dump(parameters))))
    if missing:
        raise ConfigError(
            f"deployment {spec['name']!r}: set the environment variable(s) {', '.join(missing)} ({source})"
        )
    if set(parameters) != {"config"}:
        raise ConfigError(f"deployment {spec['name']!r}: the flow takes one parameter, 'config' ({source})")
    try:
        RunConfig.model_validate(parameters["config"])
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, f"{source}, deployment {spec['name']!r}")) from exc
    return parameters


def runner_deployment(spec: dict[str, Any], source: str) -> RunnerDeployment:
    """A deployment of the pipeline flow for :func:`prefect.serve`, from one prefect.yaml entry."""
    if spec.get("entrypoint", ENTRYPOINT) != ENTRYPOINT:
        raise ConfigError(f"deployment {spec['name']!r}: entrypoint must be {ENTRYPOINT} ({source})")
    schedules = []
    for schedule in spec.get("schedules") or []:
        if set(schedule) - {"cron", "timezone", "active"} or "cron" not in schedule:
            raise ConfigError(f"deployment {spec['name']!r}: only cron schedules can be served ({schedule})")
        schedules.append(
            Cron(schedule["cron"], timezone=schedule.get("timezone"), active=schedule.get("active", True))
        )
    return factorization_pipeline.to_deployment(
        name=spec["name"],
        parameters=checked_parameters(spec, source),
        schedules=schedules,
        description=spec.get("description"),
        tags=spec.get("tags"),
        # Runs import the flow from the installed package: served from any directory.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve_deployments(prefect_file: Path, names: list[str] | None, environ: Mapping[str, str]) -> None:
    """Register the chosen deployments and run their flow runs from this process until stopped."""
    specs = select_deployments(load_deployment_specs(prefect_file, environ), names)
    serve(*[runner_deployment(spec, str(prefect_file)) for spec in specs])
