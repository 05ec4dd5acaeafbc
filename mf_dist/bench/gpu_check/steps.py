"""The check's steps that need the installed environment, one sub-command each.

``python -m mf_dist.bench.gpu_check.steps STEP --result FILE --scratch DIR [options]`` runs one
step and writes its JSON result (``passed``, ``note`` and the step's figures) to FILE. The
driver (:mod:`mf_dist.bench.gpu_check.__main__`) runs them as child processes with its clock.

Where a step's part computes on the CPU only (generating, ingesting, the co-occurrence stage, a
CPU reference), it runs in a child process that sees no GPU (``CUDA_VISIBLE_DEVICES=""``): on a
machine with GPUs, :func:`mf_dist.runtime.cluster.open_client` starts one worker per GPU with one
thread, and CPU work there would get one core of the machine's sixteen.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from mf_dist.bench.gpu_check.parity import LOSS_RTOL, TABLE_RTOL, compare_devices, prepare_parity_data

STEPS_MODULE = "mf_dist.bench.gpu_check.steps"
REPO = Path(__file__).resolve().parents[3]
MEBIBYTE = 1024 * 1024


def say(text: str) -> None:
    print(text, flush=True)


def hidden_gpu_env() -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def run_without_gpu(*args: str) -> None:
    """Run another sub-command of this module in a child process that sees no GPU (output passes through)."""
    subprocess.run([sys.executable, "-m", STEPS_MODULE, *args], env=hidden_gpu_env(), check=True)


def cpu_workers() -> int:
    return max(1, os.cpu_count() or 1)


# --- CUDA tests ------------------------------------------------------------------------------


def device_test_files(tests: Path = REPO / "tests") -> list[Path]:
    """The test modules parametrised by ``tests.support.devices.DEVICES`` (CUDA cases skip without a GPU)."""
    return sorted(
        path
        for path in tests.rglob("test_*.py")
        if "from tests.support.devices import DEVICES" in path.read_text(encoding="utf-8")
    )


def junit_summary(path: Path) -> dict:
    """Counts and failures of a pytest JUnit XML report."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {
        key: sum(int(suite.get(key, 0)) for suite in suites)
        for key in ("tests", "failures", "errors", "skipped")
    }
    failed = []
    for case in root.iter("testcase"):
        for problem in (*case.findall("failure"), *case.findall("error")):
            name = f"{case.get('classname')}::{case.get('name')}"
            failed.append({"test": name, "message": (problem.get("message") or "")[:300]})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed}


def cuda_tests(arguments: argparse.Namespace) -> dict:
    files = device_test_files()
    report = arguments.scratch / "cuda-tests.xml"
    # On a GPU only the CUDA cases (marked gpu); in a dry run the CPU cases of the same modules.
    marker = "gpu" if arguments.device == "cuda" else "not slow"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rfEs",
        "-m",
        marker,
        f"--junitxml={report}",
        *map(str, files),
    ]
    say(f"pytest -m '{marker}' on {', '.join(str(f.relative_to(REPO)) for f in files)}")
    completed = subprocess.run(command, cwd=REPO, check=False)
    summary = junit_summary(report) if report.exists() else {"tests": 0, "failed": []}
    summary["files"] = [str(f.relative_to(REPO)) for f in files]
    summary["marker"] = marker
    summary["exit_status"] = completed.returncode
    ran = summary.get("passed", 0)
    passed = completed.returncode == 0 and ran > 0
    if arguments.device == "cuda" and summary.get("skipped", 0):
        passed = False
    summary["passed"] = passed
    summary["note"] = (
        f"{ran} passed, {summary.get('failures', 0) + summary.get('errors', 0)} failed, "
        f"{summary.get('skipped', 0)} skipped"
    )
    return summary


# --- CPU/CUDA parity -------------------------------------------------------------------------


def parity(arguments: argparse.Namespace) -> dict:
    from mf_dist.runtime.cluster import open_client

    directory = arguments.scratch / "parity"
    run_without_gpu("parity-data", "--scratch", str(arguments.scratch), "--result", os.devnull)
    rows = []
    with open_client(workers=2) as client:

        def show(row: object) -> None:
            tables = ", ".join(f"{name} {diff:.1e}" for name, diff in row.table_rel_diffs.items())
            say(
                f"{row.case}: loss {row.reference_loss:.6g} / {row.candidate_loss:.6g} "
                f"(rel {row.loss_rel_diff:.1e}); tables {tables}; "
                f"{'ok' if row.passed else 'OUT OF TOLERANCE'}"
            )

        comparisons = compare_devices(client, directory / "work", arguments.device, on_case=show)
        rows = [comparison.as_dict() for comparison in comparisons]
    failed = [row["case"] for row in rows if not row["passed"]]
    return {
        "passed": not failed,
        "tolerance": {"loss_rtol": LOSS_RTOL, "table_rtol": TABLE_RTOL},
        "note": f"{len(rows) - len(failed)} of {len(rows)} cases within tolerance"
        + (f"; out: {', '.join(failed)}" if failed else ""),
        "rows": rows,
    }


def parity_data(arguments: argparse.Namespace) -> dict:
    from mf_dist.runtime.cluster import open_client

    directory = arguments.scratch / "parity"
    with open_client(workers=min(4, cpu_workers())) as client:
        prepare_parity_data(client, directory)
    return {"passed": True}


# --- data: the bench scale's ratings, generated and timed -------------------------------------


def data(arguments: argparse.Namespace) -> dict:
    import numpy as np

    from mf_dist.bench.data import ratings_dir
    from mf_dist.bench.scales import LIKE_THRESHOLD, SCALES
    from mf_dist.bench.synthetic import synthetic_ratings

    scale = SCALES[arguments.scale]
    started = time.perf_counter()
    frame = synthetic_ratings(10_000, n_users=200, n_items=500)  # compiles or loads the sampler
    compile_seconds = time.perf_counter() - started
    cache = arguments.scratch / "bench-cache"
    started = time.perf_counter()
    directory = ratings_dir(cache, scale)
    seconds = time.perf_counter() - started
    import pandas as pd

    frame = pd.read_parquet(directory)
    per_user = frame.groupby("user_id").size().to_numpy()
    result = {
        "passed": len(frame) > 0,
        "scale": scale.name,
        "ratings": len(frame),
        "users": int(frame["user_id"].nunique()),
        "items": int(frame["item_id"].nunique()),
        "likes_share": float((frame["rating"] >= LIKE_THRESHOLD).mean()),
        "ratings_per_user_min_median_max": [
            int(per_user.min()),
            float(np.median(per_user)),
            int(per_user.max()),
        ],
        "generate_and_write_seconds": seconds,
        "sampler_load_seconds": compile_seconds,
    }
    result["note"] = f"{scale.name}: {len(frame):,} ratings generated and written in {seconds:.3g} s"
    return result


# --- bench suites: ours on the device, the CPU reference in the same run -------------------------


def prepare_suite(arguments: argparse.Namespace) -> dict:
    """Prepare (generate once, ingest) a suite's data with the CPU's workers; writes the paths."""
    from mf_dist.bench.scales import SCALES
    from mf_dist.bench.suites import SUITES

    suite = SUITES[arguments.suite]
    variant = json.loads(arguments.variant)
    input_dir, work_dir = suite.prepare(
        arguments.scratch / "bench-cache", SCALES[arguments.scale], cpu_workers(), variant
    )
    return {"passed": True, "input_dir": str(input_dir), "work_dir": str(work_dir)}


def suite(arguments: argparse.Namespace) -> dict:
    from mf_dist.bench.measure import SideContext, SideFailedError, run_side_process
    from mf_dist.bench.results import SuiteResult
    from mf_dist.bench.suites import SUITES

    chosen = SUITES[arguments.suite]
    variant = json.loads(arguments.variant)
    prepared = arguments.scratch / f"prepared-{arguments.suite}.json"
    run_without_gpu(
        "prepare-suite",
        "--suite",
        arguments.suite,
        "--scale",
        arguments.scale,
        "--variant",
        arguments.variant,
        "--scratch",
        str(arguments.scratch),
        "--result",
        str(prepared),
    )
    paths = json.loads(prepared.read_text())
    # With a GPU, the local cluster is one worker per GPU whatever is asked; say so in the figures.
    workers = arguments.workers or (1 if arguments.device == "cuda" else cpu_workers())
    context = SideContext(
        suite=chosen.name,
        variant=variant,
        scale=arguments.scale,
        device=arguments.device,
        workers=workers,
        cache_dir=str(arguments.scratch / "bench-cache"),
        input_dir=paths["input_dir"],
        work_dir=paths["work_dir"],
    )
    label = chosen.name + "".join(f" {key}={value}" for key, value in variant.items())
    result = SuiteResult(suite=label, scale=arguments.scale, device=arguments.device, target=chosen.target)
    problems = []
    scratch = arguments.scratch / "sides"
    for side in ("ours", "reference"):
        if side == "reference" and (chosen.reference is None or chosen.reference_unavailable()):
            result.unavailable = chosen.reference_unavailable() or "no reference"
            continue
        say(f"{label}: {side} at {arguments.scale} on {arguments.device if side == 'ours' else 'cpu'}")
        try:
            measured = run_side_process(context, side, scratch)
        except SideFailedError as exc:
            problems.append(str(exc))
            continue
        setattr(result, side, measured)
        say(
            f"{label}: {side} {measured.seconds_per_iteration:.4g} s/it, "
            f"{measured.quality_name} {measured.quality:.6g}, {measured.implementation}"
        )
    if problems:
        result.failed = "\n".join(problems)
    row = result.model_dump()
    row["ratio"] = result.ratio
    return {
        "passed": not problems and result.ours is not None,
        "note": f"ours/ref {result.ratio:.3g}" if result.ratio is not None else (result.unavailable or ""),
        "rows": [row],
    }


# --- gradient updates: ratings per second ----------------------------------------------------


GRADIENT_EPOCHS = 2
GRADIENT_BATCHES = (1024, 16384)


def gradient(arguments: argparse.Namespace) -> dict:
    """explicit/gradient (DSGD, mini-batch Adagrad) on the bench scale's training ratings, both devices."""
    prepared = arguments.scratch / "prepared-gradient.json"
    run_without_gpu(
        "prepare-suite",
        "--suite",
        "implicit-als",
        "--scale",
        arguments.scale,
        "--variant",
        "{}",
        "--scratch",
        str(arguments.scratch),
        "--result",
        str(prepared),
    )
    work_dir = json.loads(prepared.read_text())["work_dir"]
    rows = []
    for device in dict.fromkeys([arguments.device, "cpu"]):
        out = arguments.scratch / f"gradient-{device}.json"
        command = [
            sys.executable,
            "-m",
            STEPS_MODULE,
            "gradient-run",
            "--device",
            device,
            "--work-dir",
            work_dir,
            "--scratch",
            str(arguments.scratch),
            "--result",
            str(out),
        ]
        # The CPU run gets the machine's cores as worker processes; CUDA one worker per GPU.
        env = hidden_gpu_env() if device == "cpu" else dict(os.environ)
        subprocess.run(command, env=env, check=True)
        rows += json.loads(out.read_text())["rows"]
    by_key = {(row["device"], row["batch_size"]): row for row in rows}
    for row in rows:
        cpu = by_key.get(("cpu", row["batch_size"]))
        row["speedup_over_cpu"] = row["ratings_per_second"] / cpu["ratings_per_second"] if cpu else None
    note = "; ".join(
        f"{row['device']} batch {row['batch_size']}: {row['ratings_per_second']:,.0f} ratings/s"
        for row in rows
    )
    return {"passed": all(math.isfinite(row["final_loss"]) for row in rows), "note": note, "rows": rows}


def gradient_run(arguments: argparse.Namespace) -> dict:
    from mf_dist.bench.suites import gpu_peak_details, reset_gpu_peak, steady_epoch_seconds
    from mf_dist.registry import model_spec
    from mf_dist.runtime.cluster import open_client
    from mf_dist.settings import TrainSettings
    from mf_dist.stages.train import train_factors
    from mf_dist.storage.ingested import load_ingest_result

    ingest = load_ingest_result(arguments.work_dir)
    defaults = model_spec("explicit").defaults
    rows = []
    workers = cpu_workers() if arguments.device == "cpu" else 1
    with open_client(workers=workers) as client:
        for batch_size in GRADIENT_BATCHES:
            settings = TrainSettings(
                model="explicit",
                solver="gradient",
                rank=64,
                epochs=GRADIENT_EPOCHS,
                learning_rate=defaults.learning_rate,
                regularization=defaults.regularization,
                optimizer=defaults.optimizer,
                batch_size=batch_size,
                device=arguments.device,
            )
            if arguments.device == "cuda":
                client.run(reset_gpu_peak)
            started = time.perf_counter()
            trained = train_factors(client, arguments.work_dir, settings)
            seconds = time.perf_counter() - started
            steady = steady_epoch_seconds(trained.history)
            details = gpu_peak_details(client) if arguments.device == "cuda" else {}
            row = {
                "device": arguments.device,
                "workers": len(client.scheduler_info(n_workers=-1)["workers"]),
                "batch_size": batch_size,
                "ratings": ingest.n_ratings,
                "epochs": trained.epochs,
                "seconds": seconds,
                "steady_epoch_seconds": steady,
                "ratings_per_second": ingest.n_ratings / steady if steady > 0 else math.nan,
                "final_loss": trained.final_loss,
                "train_rmse": trained.history[-1].metrics.get("train_rmse", math.nan),
                **details,
            }
            say(
                f"explicit/gradient on {arguments.device}, batch {batch_size}: "
                f"{row['ratings_per_second']:,.0f} ratings/s (steady epoch {steady:.2f} s), "
                f"loss {trained.final_loss:.4g}"
            )
            rows.append(row)
    return {"passed": True, "rows": rows}


# --- GPU memory bounded by the block size -------------------------------------------------------


MEMORY_CASES = {
    # users × rank float32 is 410 MB, over the 256 MiB the worker may hold; a block is 4 MB.
    "cuda": {"n_ratings": 8_000_000, "n_users": 400_000, "n_items": 4_000, "rank": 256, "cap_mib": 256},
    # The dry run's stand-in: the same steps, smaller, on the CPU (no cap there).
    "cpu": {"n_ratings": 400_000, "n_users": 20_000, "n_items": 500, "rank": 64, "cap_mib": 0},
}
MEMORY_BLOCK_SIZE = 4096


def memory_data(arguments: argparse.Namespace) -> dict:
    from mf_dist.bench.synthetic import synthetic_ratings, write_partitions
    from mf_dist.runtime.cluster import open_client
    from mf_dist.stages.ingest import ingest_ratings

    case = MEMORY_CASES[arguments.device]
    directory = arguments.scratch / "memory"
    shutil.rmtree(directory, ignore_errors=True)
    frame = synthetic_ratings(case["n_ratings"], n_users=case["n_users"], n_items=case["n_items"], seed=3)
    write_partitions(frame, directory / "input", n_files=8)
    with open_client(workers=cpu_workers()) as client:
        ingest_ratings(client, str(directory / "input"), directory / "work", block_size=MEMORY_BLOCK_SIZE)
    return {"passed": True}


def cap_gpu_memory(cap_bytes: int) -> float:
    """Limit torch's allocator in this (worker) process to ``cap_bytes`` of GPU 0; returns the fraction."""
    import torch

    fraction = cap_bytes / torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    torch.cuda.reset_peak_memory_stats()
    return fraction


def memory_bound(arguments: argparse.Namespace) -> dict:
    from mf_dist.bench.suites import gpu_peak_details
    from mf_dist.runtime.cluster import open_client
    from mf_dist.settings import TrainSettings
    from mf_dist.stages.train import train_factors

    case = MEMORY_CASES[arguments.device]
    run_without_gpu(
        "memory-data",
        "--device",
        arguments.device,
        "--scratch",
        str(arguments.scratch),
        "--result",
        os.devnull,
    )
    work = arguments.scratch / "memory" / "work"
    table_bytes = case["n_users"] * case["rank"] * 4
    cap = case["cap_mib"] * MEBIBYTE
    settings = TrainSettings(
        model="explicit",
        solver="gradient",
        rank=case["rank"],
        epochs=1,
        learning_rate=0.1,
        regularization=0.12,
        optimizer="adagrad",
        batch_size=8192,
        device=arguments.device,
    )
    result: dict = {
        "device": arguments.device,
        "users": case["n_users"],
        "rank": case["rank"],
        "block_size": MEMORY_BLOCK_SIZE,
        "user_table_bytes": table_bytes,
        "block_bytes": MEMORY_BLOCK_SIZE * case["rank"] * 4,
        "cap_bytes": cap,
    }
    with open_client(workers=1) as client:
        if cap:
            result["fractions"] = client.run(cap_gpu_memory, cap)
        started = time.perf_counter()
        trained = train_factors(client, work, settings)
        result["seconds"] = time.perf_counter() - started
        result["final_loss"] = trained.final_loss
        if arguments.device == "cuda":
            result.update(gpu_peak_details(client))
    peak = int(result.get("peak_gpu_bytes_max", 0))
    finished = math.isfinite(trained.final_loss)
    within = not cap or (peak <= cap < table_bytes)
    result["passed"] = finished and within
    result["note"] = (
        f"users table {table_bytes / MEBIBYTE:.0f} MiB, cap {cap / MEBIBYTE:.0f} MiB, "
        f"peak {peak / MEBIBYTE:.0f} MiB, {result['seconds']:.1f} s"
        if cap
        else f"finished on {arguments.device} (no cap off a GPU), {result['seconds']:.1f} s"
    )
    return result


# --- command line ------------------------------------------------------------------------------

STEPS = {
    "cuda-tests": cuda_tests,
    "parity": parity,
    "parity-data": parity_data,
    "data": data,
    "prepare-suite": prepare_suite,
    "suite": suite,
    "gradient": gradient,
    "gradient-run": gradient_run,
    "memory-bound": memory_bound,
    "memory-data": memory_data,
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=STEPS_MODULE)
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--scratch", type=Path, required=True)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--scale", default="tiny")
    parser.add_argument("--suite", default="")
    parser.add_argument("--variant", default="{}")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--work-dir", type=Path)
    arguments = parser.parse_args(argv)
    arguments.scratch.mkdir(parents=True, exist_ok=True)
    outcome = STEPS[arguments.step](arguments)
    if str(arguments.result) != os.devnull:
        arguments.result.write_text(json.dumps(outcome, indent=2, default=str))
    return 0 if outcome.get("passed") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
