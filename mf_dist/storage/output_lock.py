"""One writer per output directory, and the clean-up of what killed writers left behind.

Two runs that share an output also share its work directory (``<output>/_work``
by default): one would delete the other's ingested ratings while it trains
on them. Per-table atomic publishing keeps every *table* whole, but not the
work directory, so a run holds an exclusive lock on its output (and on its
work directory when that lives elsewhere) from start to finish, and a second
run is refused at once with :class:`~mf_dist.errors.OutputError` naming the
holder.

The lock is ``flock(2)`` on ``<output>/.mf-dist.lock``. The kernel releases
it when the holding process ends, however it ends (``SIGKILL`` and the OOM
killer included), so there are no stale locks to detect or break: a pid
check could be fooled by pid reuse or by a holder on another host, a
released flock cannot. The pid, host and start time written into the file
are only there to make the refusal message useful. On NFS, Linux maps
``flock`` onto NFS byte-range locks, which the server also drops when a
client disappears; filesystems without locking make the run fail with a
clear error rather than go unprotected.

An output on an object store (a URL) cannot be flocked. In this release its
run is protected only through the local work directory, which an object-store
output must name and which is locked as above; two runs writing one URL from
different work directories are not refused (each still publishes whole runs,
``LATEST`` names one of them). Before any work the bucket is checked, so a
missing bucket, missing credentials or a denied access fail first.

With the lock held nobody else is writing here, so leftovers of a killed
run (``runs/.<run_id>.partial/`` directories, ``.LATEST.*.tmp`` files) can
be removed safely: :func:`remove_debris`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mf_dist.errors import OutputError
from mf_dist.storage.filesystems import check_bucket, is_remote, local_path

logger = logging.getLogger(__name__)

LOCK_FILE = ".mf-dist.lock"


def _holder_description(lock_path: Path) -> str:
    try:
        holder = json.loads(lock_path.read_text())
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}" + (
            f", {holder['purpose']}" if holder.get("purpose") else ""
        )
    except (OSError, ValueError, KeyError, TypeError):
        # The holder may be between truncating and writing the file.
        return "holder unknown"


@contextlib.contextmanager
def exclusive_directory(directory: str | Path, purpose: str = "") -> Iterator[Path]:
    """Hold the mf-dist lock of ``directory`` (created if missing) for the ``with`` block.

    Raises :class:`OutputError` when the directory cannot be created or
    written (so an unwritable output fails before any work is done), when
    another process holds the lock, or when the filesystem cannot lock.
    """
    directory = Path(directory)
    lock_path = directory / LOCK_FILE
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{directory} is a file, not a directory; choose another --output (or --work-dir)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise OutputError(
            f"cannot write to {directory}: {exc.strerror or exc}; choose an --output (or --work-dir) "
            "this user can create and write"
        ) from exc
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"{directory} is in use by another mf-dist run ({_holder_description(lock_path)}); "
                "wait until it has finished, or give this run another --output"
            ) from None
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise OutputError(
                    f"cannot lock {lock_path}: the filesystem does not support file locks ({exc.strerror}); "
                    "put the output on a filesystem that does"
                ) from exc
            raise
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "purpose": purpose,
        }
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(holder).encode(), 0)
        yield directory
    finally:
        # The file stays: unlinking it would let a newcomer lock a fresh inode
        # while a third process still waits on the old one.
        os.close(descriptor)


@contextlib.contextmanager
def exclusive_run(
    output: str | Path,
    work_dir: str | Path,
    purpose: str = "",
    storage_options: dict[str, Any] | None = None,
) -> Iterator[None]:
    """Hold the locks a pipeline run needs: its output, and its work directory when that is elsewhere.

    For an output URL: check its bucket, and lock the (local) work directory only.
    """
    if is_remote(output):
        check_bucket(str(output), storage_options, OutputError)
        with exclusive_directory(work_dir, purpose):
            yield
        return
    output = Path(local_path(output))
    work_dir = Path(work_dir)
    with exclusive_directory(output, purpose):
        if work_dir.resolve().is_relative_to(output.resolve()):
            yield
            return
        with exclusive_directory(work_dir, purpose):
            yield


def remove_debris(output: str | Path) -> list[Path]:
    """Delete what killed writers left in the tables under ``output``; returns what was removed.

    Only call it while holding :func:`exclusive_directory` on ``output``:
    then every ``runs/.<id>.partial`` directory and ``.LATEST.*.tmp`` file
    belongs to a run that is no longer alive. Complete runs (``runs/<id>/``)
    are never touched, published or not.
    """
    removed: list[Path] = []
    if is_remote(output):
        # Unpublished runs on an object store are never read (no LATEST names them); left as they are.
        return removed
    output = Path(local_path(output))
    if not output.is_dir():
        return removed
    for table_dir in sorted(path for path in output.iterdir() if (path / "runs").is_dir()):
        for partial in sorted((table_dir / "runs").glob(".*.partial")):
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial)
        for temporary in sorted(table_dir.glob(".LATEST.*.tmp")):
            temporary.unlink(missing_ok=True)
            removed.append(temporary)
    if removed:
        logger.info(
            "removed %d leftover(s) of interrupted runs under %s: %s",
            len(removed),
            output,
            ", ".join(str(path.relative_to(output)) for path in removed),
        )
    return removed
