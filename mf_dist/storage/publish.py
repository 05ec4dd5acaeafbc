"""Publishing a run: a complete run directory moved into place, then ``LATEST`` replaced.

A run is written under ``runs/.<run_id>.partial/``, renamed to
``runs/<run_id>/`` when complete, and only then is ``LATEST`` replaced by one
``os.replace``; a reader following ``LATEST`` never sees a partial table.

On an object store (an output URL) there is no rename: a run is written
straight under ``runs/<run_id>/``, its manifest last, and ``LATEST`` is one
small-object put, which the store makes visible whole or not at all. That put
is the commit point: a killed run leaves ``LATEST`` on the previous run, and
its files under ``runs/<run_id>/`` (without a manifest, or never named by
``LATEST``) are not read by anything that follows ``LATEST``.

:func:`staged_run`, :func:`write_manifest` and :func:`publish_run` take a
path or a URL and do whichever of the two the location needs; the derived
tables (neighbors, recommendations, ann) and fold-in publish through them.
Export writes its parts on the workers and commits with
:func:`mf_dist.stages.export.publish_tables`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mf_dist.errors import OutputError
from mf_dist.storage.filesystems import is_remote, join, local_path, resolve, storage_errors
from mf_dist.storage.store import delete_prefix, exists, put_atomic, write_bytes

# The names of a run's manifest and of a table's pointer to its current run (docs/tables.md).
MANIFEST_FILE = "_manifest.json"
LATEST_FILE = "LATEST"


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus random suffix."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entry to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def move_into_place(partial: Path, final: Path) -> None:
    """Rename a completely written run directory to its final name, durably."""
    os.rename(partial, final)
    fsync_path(final.parent)


@contextlib.contextmanager
def staged_run(table_dir: str | Path, run_id: str, what: str) -> Iterator[Path | str]:
    """A run written where no reader looks until it is complete; yields where its files go.

    Local: ``runs/.<run_id>.partial/`` (a :class:`Path`), moved to
    ``runs/<run_id>/`` when the block ends. Object store (a table URL): there
    is no rename, so the run is written straight under ``runs/<run_id>/`` (a
    URL), as export does; the caller writes the manifest last
    (:func:`write_manifest`), and until ``LATEST`` names the run no reader
    follows it. On any exception the partial run is removed (on a store best
    effort: what is left has no manifest, and the next run's
    :func:`~mf_dist.storage.output_lock.remove_debris` takes it away); an
    ``OSError`` becomes an :class:`OutputError` naming ``what`` (e.g. "the
    neighbors table"), as do a store's credential, permission and bucket
    errors. ``LATEST`` is not touched: see :func:`publish_run`.
    """
    if is_remote(table_dir):
        yield from _staged_remote_run(str(table_dir), run_id, what)
        return
    table_dir = Path(local_path(table_dir))
    partial = table_dir / "runs" / f".{run_id}.partial"
    try:
        partial.mkdir(parents=True, exist_ok=False)
    except OSError as exc:
        raise OutputError(f"cannot create {partial}: {exc}") from exc
    try:
        yield partial
        move_into_place(partial, table_dir / "runs" / run_id)
    except BaseException as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {what} under {table_dir}: {exc}") from exc
        raise


def _staged_remote_run(table_url: str, run_id: str, what: str) -> Iterator[str]:
    run = join(table_url, "runs", run_id)
    with storage_errors(table_url, OutputError):
        taken = exists(join(run, MANIFEST_FILE))
    if taken:
        raise OutputError(f"{run}: a published run of this id is there already; not overwritten")
    try:
        with storage_errors(table_url, OutputError):
            yield run
    except BaseException as exc:
        with contextlib.suppress(Exception):
            delete_prefix(run)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {what} under {table_url}: {exc}") from exc
        raise


def write_manifest(run_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Write ``run_dir/_manifest.json``, flushed to disk when local (the manifest is a run's last file)."""
    write_bytes(
        join(str(run_dir), MANIFEST_FILE),
        json.dumps(manifest, indent=2, default=str).encode(),
        durable=True,
    )


def publish_run(table_dir: str | Path, run_id: str) -> None:
    """Point ``LATEST`` at ``run_id``: an atomic rename after an fsync, or one small-object put on a store."""
    if is_remote(table_dir):
        with storage_errors(str(table_dir), OutputError):
            put_atomic(join(str(table_dir), LATEST_FILE), (run_id + "\n").encode())
        return
    table_dir = Path(local_path(table_dir))
    temporary = table_dir / f".LATEST.{run_id}.tmp"
    with open(temporary, "w") as handle:
        handle.write(run_id + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, table_dir / LATEST_FILE)
    # The rename is durable only once the directory entry is on disk.
    fsync_path(table_dir)


def publish_run_remote(table_url: str, run_id: str, storage_options: dict[str, Any] | None = None) -> None:
    """Point ``<table_url>/LATEST`` at ``run_id``: a single small-object put (the commit point)."""
    filesystem, table_path = resolve(table_url, storage_options)
    with storage_errors(table_url, OutputError):
        filesystem.pipe_file(join(table_path, "LATEST"), (run_id + "\n").encode())
