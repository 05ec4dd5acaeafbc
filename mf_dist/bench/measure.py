"""Running one side of a suite in its own process tree, timed, with its peak memory.

Each side runs as ``python -m mf_dist.bench.side``: a fresh interpreter whose
resident memory starts from nothing, so the peak a side reports is its own
and not the other side's leftovers (CPython rarely returns freed memory to the
OS, so measuring both sides in one process would charge the second side with
the first one's peak). Inside, :class:`~mf_dist.runtime.memory_monitor.PeakMemoryMonitor`
samples that process and all its children: the local Dask workers of ours,
the JVM of Spark.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from mf_dist.bench.results import SideResult

SideName = Literal["ours", "reference"]


class SideContext(BaseModel):
    """What a side process needs to know: the prepared data and the suite's settings."""

    suite: str
    variant: dict[str, int | float | str]
    scale: str
    device: str
    workers: int
    cache_dir: str
    input_dir: str
    work_dir: str


@dataclass
class Timed:
    """What a side's function reports; memory is added by :func:`run_side_here`."""

    implementation: str
    seconds: float
    quality_name: str
    quality: float
    threads: int
    """The cores the side was given: our worker processes × threads each, the reference's threads."""
    iterations: int = 1
    details: dict[str, float | int | str] = field(default_factory=dict)


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """``with stopwatch() as elapsed: ...`` then ``elapsed[0]`` is the wall time in seconds."""
    elapsed = [0.0]
    started = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed[0] = time.perf_counter() - started


def run_side_here(body: Callable[[SideContext], Timed], context: SideContext) -> SideResult:
    """Run ``body`` in this process under a peak-memory monitor of this process tree."""
    from mf_dist.runtime.memory_monitor import PeakMemoryMonitor

    with PeakMemoryMonitor(interval=0.1) as memory:
        timed = body(context)
    return SideResult(
        implementation=timed.implementation,
        seconds=timed.seconds,
        iterations=timed.iterations,
        threads=timed.threads,
        peak_process_bytes=memory.peak_process_bytes,
        peak_total_bytes=memory.peak_total_bytes,
        quality_name=timed.quality_name,
        quality=timed.quality,
        details=timed.details,
    )


class SideFailedError(RuntimeError):
    """A side's process exited with an error; the message ends with its last output lines."""


def run_side_process(context: SideContext, side: SideName, scratch: Path) -> SideResult:
    """Run one side in a child interpreter and read back its :class:`SideResult`."""
    scratch.mkdir(parents=True, exist_ok=True)
    # One pair of files per variant: implicit-als runs k = 64 and k = 128 in one command.
    name = "-".join([context.suite, *(f"{key}{value}" for key, value in context.variant.items()), side])
    context_path = scratch / f"{name}-context.json"
    result_path = scratch / f"{name}-result.json"
    result_path.unlink(missing_ok=True)
    context_path.write_text(context.model_dump_json())
    completed = subprocess.run(
        [sys.executable, "-m", "mf_dist.bench.side", str(context_path), side, str(result_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0 or not result_path.exists():
        tail = "\n".join((completed.stderr or completed.stdout).strip().splitlines()[-8:])
        raise SideFailedError(f"{context.suite} ({side}) exited with status {completed.returncode}:\n{tail}")
    return SideResult.model_validate_json(result_path.read_text())
