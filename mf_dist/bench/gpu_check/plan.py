"""The check's steps, its clock and budget: run a step only where its estimate fits the time left,
stop one that outruns the budget, and keep going with the next.

Standard library only: the driver runs this before anything is installed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TextIO

Status = Literal["passed", "failed", "skipped", "timed out"]

# Seconds kept back at the end for writing the results.
RESERVE_SECONDS = 10.0
# A silent step is announced this often, so the clock keeps moving on screen.
HEARTBEAT_SECONDS = 30.0
# After SIGTERM, a step's process group gets this long before SIGKILL.
KILL_GRACE_SECONDS = 5.0


class Clock:
    """Wall time since the check started (``started`` may be earlier than now: the shell's prelude)."""

    def __init__(
        self, budget: float, started: float | None = None, now: Callable[[], float] = time.time
    ) -> None:
        self.budget = budget
        self.now = now
        self.started = now() if started is None else started

    @property
    def elapsed(self) -> float:
        return self.now() - self.started

    @property
    def remaining(self) -> float:
        return self.budget - self.elapsed

    def stamp(self) -> str:
        """``[m:ss]`` of the time elapsed, the prefix of every line the check prints."""
        seconds = max(0, int(self.elapsed))
        return f"[{seconds // 60}:{seconds % 60:02d}]"


@dataclass
class Outcome:
    """What one step did."""

    name: str
    status: Status
    seconds: float = 0.0
    started_at: float = 0.0
    note: str = ""
    result: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 2),
            "started_at": round(self.started_at, 2),
            "note": self.note,
            "result": self.result,
        }


@dataclass
class Step:
    """One step: what it runs and how long it is expected to take.

    ``run(context)`` returns ``(passed, note, result)`` for a step done in
    this process, or ``command(context)`` gives the argv of a child process
    (with ``env`` added to its environment) whose JSON result file is read by
    ``read_result(context)``. ``estimate`` is the expected wall time in
    seconds; ``needs`` names steps that must have passed first. ``prepare``
    runs just before the step and may change the context (choose a scale);
    ``estimate`` may be a function of the context.
    """

    name: str
    estimate: float | Callable[[dict], float]
    run: Callable[[dict], tuple[bool, str, dict]] | None = None
    command: Callable[[dict], Sequence[str]] | None = None
    env: dict[str, str] = field(default_factory=dict)
    read_result: Callable[[dict], dict] | None = None
    needs: tuple[str, ...] = ()
    prepare: Callable[[dict, float], str | None] | None = None
    """``prepare(context, seconds left)`` → None to go on, or the reason to skip the step."""

    def expected(self, context: dict) -> float:
        return self.estimate(context) if callable(self.estimate) else self.estimate


def unmet_need(step: Step, done: dict[str, Outcome]) -> str | None:
    """Why ``step`` cannot run at all: a step it needs did not pass (or did not run)."""
    for need in step.needs:
        if need not in done or done[need].status != "passed":
            status = done[need].status if need in done else "not run"
            return f"needs {need} ({status})"
    return None


def over_budget(step: Step, clock: Clock, context: dict) -> str | None:
    """Why ``step`` should not start now: its estimate does not fit the time left (less the reserve)."""
    left = clock.remaining - RESERVE_SECONDS
    expected = step.expected(context)
    if expected > left:
        return f"estimated {expected:.0f} s, {max(0.0, left):.0f} s left in the budget"
    return None


class Runner:
    """Runs steps in order against one clock; prints every line with the clock; collects outcomes."""

    def __init__(self, clock: Clock, console: TextIO = sys.stdout, log: TextIO | None = None) -> None:
        self.clock = clock
        self.console = console
        self.log = log
        self.outcomes: list[Outcome] = []
        self.context: dict = {}
        self._lock = threading.Lock()

    def say(self, text: str) -> None:
        with self._lock:
            for line in text.rstrip("\n").splitlines() or [""]:
                stamped = f"{self.clock.stamp()} {line}"
                print(stamped, file=self.console, flush=True)
                if self.log is not None:
                    print(stamped, file=self.log, flush=True)

    def run_all(self, steps: Sequence[Step]) -> list[Outcome]:
        done: dict[str, Outcome] = {}
        for step in steps:
            outcome = self.run_step(step, done)
            done[step.name] = outcome
            self.outcomes.append(outcome)
        return self.outcomes

    def run_step(self, step: Step, done: dict[str, Outcome]) -> Outcome:
        started = self.clock.elapsed
        reason = unmet_need(step, done)
        if reason is None and step.prepare is not None:
            reason = step.prepare(self.context, self.clock.remaining - RESERVE_SECONDS)
        reason = reason or over_budget(step, self.clock, self.context)
        if reason is not None:
            self.say(f"-- {step.name}: skipped ({reason})")
            return Outcome(step.name, "skipped", 0.0, started, reason)
        expected = step.expected(self.context)
        self.say(f"== {step.name} (estimated {expected:.0f} s, {self.clock.remaining:.0f} s left)")
        try:
            if step.run is not None:
                passed, note, result = step.run(self.context)
                status: Status = "passed" if passed else "failed"
            else:
                status, note = self._run_child(step)
                result = {}
                if step.read_result is not None:
                    try:
                        result = step.read_result(self.context)
                    except (OSError, ValueError) as exc:
                        if status == "passed":
                            status, note = "failed", f"no result: {exc}"
                if status == "passed" and result.get("passed") is False:
                    status = "failed"
                note = note or str(result.get("note", ""))
        except Exception as exc:  # a broken step is reported, and the next one runs
            status, note, result = "failed", f"{type(exc).__name__}: {exc}", {}
        seconds = self.clock.elapsed - started
        self.say(f"== {step.name}: {status} in {seconds:.1f} s" + (f" ({note})" if note else ""))
        return Outcome(step.name, status, seconds, started, note, result)

    def _run_child(self, step: Step) -> tuple[Status, str]:
        """Run the step's command in its own process group until it ends or the budget does."""
        deadline = self.clock.remaining - RESERVE_SECONDS
        process = subprocess.Popen(
            list(step.command(self.context)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env={**os.environ, **step.env},
            start_new_session=True,
        )
        reader = threading.Thread(target=self._echo, args=(process.stdout, step.name), daemon=True)
        reader.start()
        started = time.monotonic()
        while True:
            left = deadline - (time.monotonic() - started)
            try:
                process.wait(timeout=max(0.0, min(HEARTBEAT_SECONDS, left)))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() - started >= deadline:
                    self.say(f"   {step.name}: out of time, stopping it")
                    stop_group(process)
                    reader.join(timeout=5)
                    return "timed out", f"stopped at the budget after {time.monotonic() - started:.0f} s"
                self.say(f"   {step.name}: still running ({time.monotonic() - started:.0f} s)")
        reader.join(timeout=5)
        if process.returncode != 0:
            return "failed", f"exit status {process.returncode}"
        return "passed", ""

    def _echo(self, stream: TextIO, name: str) -> None:
        for line in stream:
            self.say(f"   {line.rstrip()}")


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group of ``process`` (its Dask workers too), then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=KILL_GRACE_SECONDS)
    # The leader may be gone while its group is not.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=KILL_GRACE_SECONDS)


def choose_scale(estimates: dict[str, float], left: float) -> str | None:
    """The largest scale (in the dict's order, smallest first) whose estimate fits ``left`` seconds."""
    fitting = [scale for scale, seconds in estimates.items() if seconds <= left]
    return fitting[-1] if fitting else None
