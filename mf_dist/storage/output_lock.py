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

An output on an object store (a URL) cannot be flocked. There the lock is
the object ``<output>/.mf-dist.lock``, created only if absent (S3's
conditional put, ``If-None-Match: *``, through s3fs ``mode="create"``) and
holding an expiry time that the holder renews while it runs
(:data:`REMOTE_LOCK_SECONDS`, renewed every third of it). A run killed
without removing it blocks the output until the expiry passes; then the next
run takes it over. The holder reads its lock back after creating it, so a
store that ignores the condition still refuses the loser of all but an exact
race. The (local) work directory is flocked as well. Before any work the
bucket is checked, so a missing bucket, missing credentials or a denied
access fail first.

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
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mf_dist.errors import OutputError
from mf_dist.storage.filesystems import check_bucket, is_remote, join, local_path, resolve, storage_errors
from mf_dist.storage.reader import MANIFEST_FILE
from mf_dist.storage.store import delete_prefix, exists, list_names, read_bytes

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


REMOTE_LOCK_SECONDS = 600.0


@contextlib.contextmanager
def exclusive_object_store(
    output: str,
    purpose: str = "",
    storage_options: dict[str, Any] | None = None,
    lifetime: float = REMOTE_LOCK_SECONDS,
) -> Iterator[None]:
    """Hold the lock object of an output URL for the ``with`` block (see the module docstring)."""
    filesystem, root = resolve(output, storage_options)
    lock_path = join(root, LOCK_FILE)
    token = secrets.token_hex(8)

    def holder() -> bytes:
        now = time.time()
        return json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "purpose": purpose,
                "expires": now + lifetime,
                "token": token,
            }
        ).encode()

    def current() -> dict[str, Any] | None:
        try:
            return json.loads(filesystem.cat_file(lock_path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}

    with storage_errors(output, OutputError):
        for _ in range(2):
            try:
                filesystem.pipe_file(lock_path, holder(), mode="create")
            except FileExistsError:
                held = current()
                if held is not None and float(held.get("expires", 0)) > time.time():
                    description = (
                        f"pid {held.get('pid')} on {held.get('host')}, started {held.get('started')}"
                        + (f", {held['purpose']}" if held.get("purpose") else "")
                    )
                    raise OutputError(
                        f"{output} is in use by another mf-dist run ({description}); wait until it has "
                        f"finished (a killed run's lock expires {lifetime:.0f} s after its last renewal), "
                        "or give this run another --output"
                    ) from None
                # Expired (its holder was killed) or unreadable: take it over.
                with contextlib.suppress(FileNotFoundError):
                    filesystem.rm_file(lock_path)
                continue
            if (current() or {}).get("token") != token:
                raise OutputError(f"{output} is in use by another mf-dist run (it took the lock at once)")
            break
        else:
            raise OutputError(f"{output}: could not take the output lock {LOCK_FILE}; try again")

    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lifetime / 3):
            with contextlib.suppress(Exception):
                filesystem.pipe_file(lock_path, holder())

    renewer = threading.Thread(target=renew, name="mf-dist-lock-renewal", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        with contextlib.suppress(Exception):
            if (current() or {}).get("token") == token:
                filesystem.rm_file(lock_path)


@contextlib.contextmanager
def exclusive_run(
    output: str | Path,
    work_dir: str | Path,
    purpose: str = "",
    storage_options: dict[str, Any] | None = None,
) -> Iterator[None]:
    """Hold the locks a pipeline run needs: its output, and its work directory when that is elsewhere.

    Each is a lock object on an object store (after checking its bucket), a
    flocked directory otherwise; a work directory inside the output is
    covered by the output's lock. On an object store, taking the lock is
    itself a write under the output; the work directory gets a write probe
    as well (:func:`probe_writable`), so a denied write fails here, before
    any work, not at the first checkpoint an hour later.
    """
    with contextlib.ExitStack() as held:
        for index, location in enumerate((str(output), str(work_dir))):
            if index == 1 and _inside(str(work_dir), str(output)):
                if is_remote(location):
                    probe_writable(location, storage_options)
                break
            if is_remote(location):
                check_bucket(location, storage_options, OutputError)
                held.enter_context(exclusive_object_store(location, purpose, storage_options))
            else:
                held.enter_context(exclusive_directory(Path(local_path(location)), purpose))
        yield


@contextlib.contextmanager
def exclusive_output(
    output: str | Path, purpose: str = "", storage_options: dict[str, Any] | None = None
) -> Iterator[None]:
    """Hold the lock of one output, local or not, for a command that publishes a table there.

    :func:`exclusive_run` with the output as its own work directory: a flocked
    directory, or (after its bucket is checked) the lock object of an output URL.
    """
    with exclusive_run(output, output, purpose, storage_options):
        yield


def probe_writable(location: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write and delete a tiny object under ``location``; :class:`OutputError` (one line) when denied."""
    filesystem, root = resolve(location, storage_options)
    probe = join(root, f".mf-dist-write-probe-{secrets.token_hex(4)}")
    with storage_errors(location, OutputError):
        filesystem.pipe_file(probe, b"")
        filesystem.rm_file(probe)


def _inside(inner: str, outer: str) -> bool:
    """Whether location ``inner`` is ``outer`` or below it (both paths, or both URLs)."""
    if is_remote(inner) or is_remote(outer):
        return is_remote(inner) and (inner.rstrip("/") + "/").startswith(outer.rstrip("/") + "/")
    return Path(inner).resolve().is_relative_to(Path(local_path(outer)).resolve())


def remove_debris(output: str | Path) -> list[Path | str]:
    """Delete what killed writers left in the tables under ``output``; returns what was removed.

    Only call it while holding :func:`exclusive_run` on ``output``:
    then every ``runs/.<id>.partial`` directory and ``.LATEST.*.tmp`` file
    belongs to a run that is no longer alive. Complete runs (``runs/<id>/``)
    are never touched, published or not. On an object store (no rename) the
    debris is a ``runs/<id>/`` prefix without its manifest (written last),
    other than the run ``LATEST`` names: see :func:`_remove_remote_debris`.
    """
    if is_remote(output):
        return list(_remove_remote_debris(str(output)))
    removed: list[Path | str] = []
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
            ", ".join(str(Path(path).relative_to(output)) for path in removed),
        )
    return removed


def _remove_remote_debris(output: str) -> list[str]:
    """:func:`remove_debris` on an object store: ``runs/<id>/`` prefixes without a manifest.

    The lock is held, so no live run is writing one of them; the run named by
    ``LATEST`` is kept whatever it holds (a reader may be following it).
    """
    removed: list[str] = []
    with storage_errors(output, OutputError):
        for table in list_names(output):
            runs = join(output, table, "runs")
            run_ids = list_names(runs)
            if not run_ids:
                continue
            try:
                current = read_bytes(join(output, table, "LATEST")).decode().strip()
            except FileNotFoundError:
                current = None
            for run_id in run_ids:
                run = join(runs, run_id)
                if run_id != current and not exists(join(run, MANIFEST_FILE)):
                    delete_prefix(run)
                    removed.append(run)
    if removed:
        logger.info("removed %d leftover(s) of interrupted runs: %s", len(removed), ", ".join(removed))
    return removed
