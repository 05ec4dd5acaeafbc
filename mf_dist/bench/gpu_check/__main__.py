"""``python -m mf_dist.bench.gpu_check --out DIR [--dry-run]``: the GPU check's driver (deploy/gpu/check.sh).

Runs under the machine's own Python. Steps, in order, each only if its estimate fits the time
left (the rest are reported as skipped):

1. ``wheelhouse``: the carried wheelhouse is there, serves this Python, fits the budget.
2. ``install``: a fresh venv over the machine's packages, filled from the wheelhouse alone.
3. ``cuda-tests``: the device-parametrised tests' CUDA cases (their CPU cases in a dry run).
4. ``parity``: every model × solver on the device against the CPU, same seed.
5. ``memory-bound``: a factor table larger than the GPU memory the worker is allowed, trained.
6. ``data``: the ml20m set generated (and cached for the suites), timed.
7. ``implicit-als``, ``gradient``, ``cooccurrence``, ``recommend`` (all users' top 100): bench
   suites, each at the largest scale whose estimate fits, ours on the device beside the CPU reference.

A dry run (``--dry-run``, or no CUDA) runs the same steps with the CPU as the device, at the
tiny scale, so a broken step shows before a GPU is at hand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from mf_dist.bench.gpu_check import install as installer
from mf_dist.bench.gpu_check import report as reports
from mf_dist.bench.gpu_check import wheelhouse as wheels
from mf_dist.bench.gpu_check.plan import Clock, Outcome, Runner, Step, choose_scale

REPO = Path(__file__).resolve().parents[3]
GPU_BUDGET_SECONDS = 480.0
DRY_BUDGET_SECONDS = 1800.0
SCALES = ("tiny", "small", "ml20m")

# Expected wall seconds of each step (one H100 or H200 machine with 16 cores; the 2-core
# development machine for the dry run). Scale-dependent steps give one figure per scale.
ESTIMATES = {
    "gpu": {
        "wheelhouse": 1,
        "install": 30,
        "cuda-tests": 45,
        "parity": 90,
        "memory-bound": 50,
        "data": {"tiny": 5, "small": 10, "ml20m": 30},
        "implicit-als": {"tiny": 45, "small": 60, "ml20m": 120},
        "cooccurrence": {"tiny": 30, "small": 40, "ml20m": 75},
        "gradient": {"tiny": 45, "small": 60, "ml20m": 150},
        # ml20m: ingesting 20 M ratings for the seen filter is most of it.
        "recommend": {"tiny": 30, "small": 45, "ml20m": 120},
    },
    "dry": {
        "wheelhouse": 1,
        "install": 90,
        "cuda-tests": 120,
        "parity": 300,
        "memory-bound": 90,
        "data": {"tiny": 15},
        "implicit-als": {"tiny": 120},
        "cooccurrence": {"tiny": 90},
        "gradient": {"tiny": 120},
        "recommend": {"tiny": 60},
    },
}


def estimate(mode: str, name: str, scale: str | None = None) -> float:
    value = ESTIMATES[mode][name]
    return float(value[scale]) if isinstance(value, dict) else float(value)


SCALED_STEPS = ("data", "implicit-als", "gradient", "cooccurrence")
"""The steps that pick a scale, in the order they run, each leaving the later ones their smallest run.

``recommend`` also picks one, after them, from what they leave: nothing is held back for it."""


def scale_chooser(mode: str, name: str, key: str) -> Callable[[dict, float], str | None]:
    """A ``prepare`` hook: put into ``context[key]`` the largest scale whose estimate fits.

    The time left is first cut by the smallest estimate of each scaled step after this one,
    so that one large run does not leave the others without a figure.
    """
    later = SCALED_STEPS[SCALED_STEPS.index(name) + 1 :] if name in SCALED_STEPS else ()
    reserve = sum(min(ESTIMATES[mode][step].values()) for step in later)

    def prepare(context: dict, left: float) -> str | None:
        scales = ESTIMATES[mode][name]
        chosen = choose_scale({scale: scales[scale] for scale in SCALES if scale in scales}, left - reserve)
        if chosen is None:
            # Nothing fits beside the others: take the smallest if it fits alone.
            chosen = choose_scale({scale: scales[scale] for scale in SCALES[:1] if scale in scales}, left)
        if chosen is None:
            return f"no scale fits the {max(0.0, left):.0f} s left"
        context[key] = chosen
        return None

    return prepare


def build_steps(
    arguments: argparse.Namespace, mode: str, device: str, say: Callable[[str], None] = print
) -> list[Step]:
    """The check's steps for ``mode`` (``gpu`` or ``dry``), our side computing on ``device``."""
    scratch, venv = arguments.scratch, arguments.scratch / "venv"
    cores = str(os.cpu_count() or 1)

    def result_path(step: str) -> Path:
        return scratch / "results" / f"{step}.json"

    def child(
        step: str, sub_command: str, *extra: str, scale_key: str | None = None, on: str = device
    ) -> Step:
        """A step run as ``python -m mf_dist.bench.gpu_check.steps SUB_COMMAND`` in the new venv."""

        def command(context: dict) -> list[str]:
            scale = ["--scale", context[scale_key]] if scale_key else []
            return [
                str(installer.venv_python(venv)),
                "-m",
                "mf_dist.bench.gpu_check.steps",
                sub_command,
                "--device",
                on,
                "--scratch",
                str(scratch / "steps"),
                "--result",
                str(result_path(step)),
                *scale,
                *extra,
            ]

        return Step(
            step,
            timed(step, scale_key),
            command=command,
            read_result=lambda context: json.loads(result_path(step).read_text()),
            needs=("install",),
            prepare=scale_chooser(mode, step, scale_key) if scale_key else None,
        )

    def timed(step: str, scale_key: str | None = None) -> float | Callable[[dict], float]:
        if scale_key is None:
            return estimate(mode, step)
        return lambda context: estimate(mode, step, context.get(scale_key, "tiny"))

    def check_wheelhouse(context: dict) -> tuple[bool, str, dict]:
        other = wheels.tree_bytes(REPO, (arguments.wheelhouse, scratch, arguments.out))
        summary = wheels.report(arguments.wheelhouse, other)
        context["python_tags"] = summary["python_tags"]
        return summary["fits"], wheels.describe(summary), summary

    def install(context: dict) -> tuple[bool, str, dict]:
        served = context.get("python_tags", [])
        return installer.install(venv, arguments.wheelhouse, arguments.requirements, served, log=say)

    implicit_als = child(
        "implicit-als",
        "suite",
        "--suite",
        "implicit-als",
        "--variant",
        '{"rank": 64}',
        scale_key="scale:implicit-als",
    )
    implicit_als.env = {"MF_DIST_BENCH_REFERENCE_THREADS": cores}
    # Both sides of the co-occurrence stage are CPU work: the GPU is hidden, so that the workers
    # are the machine's cores (one worker per GPU otherwise).
    cooccurrence = child(
        "cooccurrence", "suite", "--suite", "cooccurrence", scale_key="scale:cooccurrence", on="cpu"
    )
    cooccurrence.env = {"CUDA_VISIBLE_DEVICES": ""}
    recommend = child(
        "recommend", "suite", "--suite", "recommend", "--variant", '{"n": 100}', scale_key="scale:recommend"
    )
    recommend.env = {"MF_DIST_BENCH_REFERENCE_THREADS": cores}
    data = child("data", "data", scale_key="scale:data")
    data.env = {"CUDA_VISIBLE_DEVICES": ""}
    return [
        Step("wheelhouse", timed("wheelhouse"), run=check_wheelhouse),
        Step("install", timed("install"), run=install, needs=("wheelhouse",)),
        child("cuda-tests", "cuda-tests"),
        child("parity", "parity"),
        child("memory-bound", "memory-bound"),
        data,
        # The GPU's figures first; the co-occurrence stage is CPU work and comes last.
        implicit_als,
        child("gradient", "gradient", scale_key="scale:gradient"),
        cooccurrence,
        # Last, on the time the others leave (not in SCALED_STEPS): their figures come first.
        recommend,
    ]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mf_dist.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the JSON, Markdown and log go")
    parser.add_argument(
        "--dry-run", action="store_true", help="the CPU part of every step (default without CUDA)"
    )
    parser.add_argument("--budget", type=float, help="wall seconds for the whole check")
    parser.add_argument(
        "--started-at", type=float, help="epoch seconds the check started (the shell's prelude)"
    )
    parser.add_argument(
        "--scratch", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mf-dist-gpu-check"
    )
    parser.add_argument("--wheelhouse", type=Path, default=REPO / "deploy" / "gpu" / "wheelhouse")
    parser.add_argument("--requirements", type=Path, default=REPO / "deploy" / "gpu" / "requirements.txt")
    parser.add_argument(
        "--only", help="comma-separated steps to run after the install (the others are left out)"
    )
    arguments = parser.parse_args(argv)

    mode = "dry" if arguments.dry_run else "gpu"
    device = "cpu" if arguments.dry_run else "cuda"
    budget = arguments.budget or (DRY_BUDGET_SECONDS if arguments.dry_run else GPU_BUDGET_SECONDS)
    clock = Clock(budget, arguments.started_at)
    arguments.out.mkdir(parents=True, exist_ok=True)
    for folder in ("steps", "results"):
        (arguments.scratch / folder).mkdir(parents=True, exist_ok=True)
    for stale in (arguments.scratch / "results").glob("*.json"):
        stale.unlink()
    with open(arguments.out / reports.LOG_NAME, "w") as log:
        runner = Runner(clock, sys.stdout, log)
        runner.say(
            f"mf-dist GPU check, {'dry run (the CPU as the device)' if arguments.dry_run else 'CUDA'}: "
            f"budget {budget:.0f} s, results in {arguments.out}, scratch {arguments.scratch}"
        )
        steps = build_steps(arguments, mode, device, runner.say)
        if arguments.only:
            wanted = {"wheelhouse", "install", *arguments.only.split(",")}
            steps = [step for step in steps if step.name in wanted]
        done: dict[str, Outcome] = {}
        for step in steps:
            done[step.name] = runner.run_step(step, done)
            doc = reports.document(list(done.values()), mode=mode, budget=budget, elapsed=clock.elapsed)
            reports.write(arguments.out, doc)
        json_path, markdown_path = reports.write(arguments.out, doc)
        runner.say(
            f"{'passed' if doc['passed'] else 'NOT passed'} in {clock.elapsed:.0f} s: "
            f"{json_path}, {markdown_path}"
        )
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
