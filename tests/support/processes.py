"""Real server processes for tests: started in their own session, always killed as a group.

Every process writes to a log file under the test's temporary directory; a
failing test prints the tails of those logs, which is where the reason is.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
# sbatch, scancel and srun that run jobs on this machine (see the scripts).
SLURM_STANDIN = Path(__file__).parent / "slurm_standin"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, group: ProcessGroup | None = None
) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` (and the logs) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if group is not None:
            group.check_alive()
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f} s" + (group.log_tails() if group else ""))


class ProcessGroup:
    """Processes started for one test; :meth:`stop` kills each one's whole process group."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self, name: str, args: list[str | Path], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        process = subprocess.Popen(
            [str(arg) for arg in args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            # A session of its own: killing its group also ends whatever it spawned
            # (flow-run subprocesses, nanny-managed workers).
            start_new_session=True,
        )
        log.close()
        self.processes[name] = process
        return process

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with status {process.returncode}" + self.log_tails())

    def log_tails(self, lines: int = 40) -> str:
        parts = []
        for name in self.processes:
            text = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()
            parts.append(f"\n--- {name} (last {lines} lines) ---\n" + "\n".join(text[-lines:]))
        return "".join(parts)

    def stop(self) -> None:
        """SIGTERM every group, then SIGKILL what is left after 10 s, descendants included."""
        # Descendants that moved to a session of their own (a flow run started
        # by a Prefect worker) are not in the group; find them first.
        descendants = []
        for process in self.processes.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                descendants += psutil.Process(process.pid).children(recursive=True)
        for process in self.processes.values():
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            _signal_group(process, signal.SIGKILL)
            process.wait()
        for child in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


@contextmanager
def process_group(log_dir: Path) -> Iterator[ProcessGroup]:
    """A :class:`ProcessGroup` that is stopped when the block exits, on failure too."""
    group = ProcessGroup(log_dir)
    try:
        yield group
    finally:
        group.stop()
