"""Reading published tables back: the Python side of the contract in docs/tables.md.

A table is found from any of three paths::

    out/                    an output directory: the table is out/<table>/ (``items`` unless told)
    out/items/              a table directory: follows LATEST to the current run
    out/items/runs/<run>/   one run directory, read as is

Each may also be a URL (``s3://bucket/out``): then LATEST is read from the
store and the run's files through fsspec (:mod:`mf_dist.storage.filesystems`).

Every read checks the manifest's ``format_version`` first, so a table written
under another contract fails with a message that says what to do instead of
with wrong numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mf_dist.errors import OutputError
from mf_dist.storage.filesystems import (
    check_bucket,
    full_url,
    is_remote,
    join,
    local_path,
    resolve,
    storage_errors,
)
from mf_dist.storage.publish import LATEST_FILE, MANIFEST_FILE
from mf_dist.storage.schema import FORMAT_VERSION
from mf_dist.storage.store import options_for

if TYPE_CHECKING:
    import torch


def resolve_run_dir(path: str | Path, table: str = "items") -> Path:
    """The run directory ``path`` designates (see the module docstring for the three forms).

    Raises :class:`OutputError` when ``path`` is none of them, or when LATEST
    names a run that is not there.
    """
    path = Path(path)
    if (path / MANIFEST_FILE).is_file():
        return path
    if (path / LATEST_FILE).is_file():
        table_dir = path
    elif (path / table / LATEST_FILE).is_file():
        table_dir = path / table
    elif not path.exists():
        raise OutputError(f"{path}: no such directory")
    else:
        raise OutputError(
            f"{path}: not an mf-dist table; give an output directory (with {table}/LATEST), "
            f"a table directory such as out/{table} (with LATEST) or a run directory (with {MANIFEST_FILE})"
        )
    run_id = (table_dir / LATEST_FILE).read_text().strip()
    run_dir = table_dir / "runs" / run_id
    if not (run_dir / MANIFEST_FILE).is_file():
        raise OutputError(
            f"{table_dir / LATEST_FILE} names run {run_id!r}, but {run_dir} has no {MANIFEST_FILE}; "
            "the run was removed or the directory was copied incompletely"
        )
    return run_dir


def _options(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The options given, else those a run registered for the URL's bucket (inside a pipeline run)."""
    return storage_options if storage_options is not None else options_for(url)


def find_run(
    path: str | Path, table: str = "items", storage_options: dict[str, Any] | None = None
) -> Path | str:
    """The run ``path`` designates, local or not: a :class:`Path` for a local path, the run's URL for a URL.

    :func:`resolve_run_dir` or :func:`resolve_remote_run`, whichever ``path`` needs.
    """
    if is_remote(path):
        return resolve_remote_run(str(path), table, storage_options)
    return resolve_run_dir(local_path(path), table)


def output_of_run(run: Path | str) -> Path | str:
    """The output directory (or URL) a run belongs to: ``<output>/<table>/runs/<run_id>`` → ``<output>``."""
    if isinstance(run, Path):
        return run.parents[2]
    return str(run).rstrip("/").rsplit("/", 3)[0]


def run_in(output: str | Path, table: str, run_id: str) -> Path | str:
    """The location of run ``run_id`` of ``table`` under ``output`` (a Path when local, else a URL)."""
    if is_remote(output):
        return join(str(output), table, "runs", run_id)
    return Path(local_path(output)) / table / "runs" / run_id


def resolve_remote_run(url: str, table: str = "items", storage_options: dict[str, Any] | None = None) -> str:
    """:func:`resolve_run_dir` for a URL: the URL of the run it designates."""
    storage_options = _options(url, storage_options)
    filesystem, path = resolve(url, storage_options)
    path = path.rstrip("/")
    with storage_errors(url, OutputError):
        if filesystem.isfile(join(path, MANIFEST_FILE)):
            return url.rstrip("/")
        if filesystem.isfile(join(path, LATEST_FILE)):
            table_path = path
        elif filesystem.isfile(join(path, table, LATEST_FILE)):
            table_path = join(path, table)
        else:
            check_bucket(url, storage_options, OutputError)
            raise OutputError(
                f"{url}: not an mf-dist table; give an output URL (with {table}/LATEST), a table URL "
                f"(with LATEST) or a run URL (with {MANIFEST_FILE})"
            )
        run_id = filesystem.cat_file(join(table_path, LATEST_FILE)).decode().strip()
        run_path = join(table_path, "runs", run_id)
        if not filesystem.isfile(join(run_path, MANIFEST_FILE)):
            raise OutputError(
                f"{full_url(filesystem, join(table_path, LATEST_FILE))} names run {run_id!r}, but it has "
                f"no {MANIFEST_FILE}; the run was removed or copied incompletely"
            )
    return full_url(filesystem, run_path)


def read_manifest(run_dir: str | Path, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of one run, after checking that its format version is the one this code reads."""
    if is_remote(run_dir):
        filesystem, path = resolve(str(run_dir), _options(str(run_dir), storage_options))
        manifest_path: Any = join(str(run_dir), MANIFEST_FILE)
        with storage_errors(manifest_path, OutputError):
            try:
                text = filesystem.cat_file(join(path, MANIFEST_FILE)).decode()
            except FileNotFoundError as exc:
                raise OutputError(
                    f"{manifest_path}: missing; {run_dir} is not a published mf-dist run"
                ) from exc
    else:
        manifest_path = Path(run_dir) / MANIFEST_FILE
        text = None
    try:
        manifest = json.loads(text if text is not None else manifest_path.read_text())
    except FileNotFoundError as exc:
        raise OutputError(f"{manifest_path}: missing; {run_dir} is not a published mf-dist run") from exc
    except json.JSONDecodeError as exc:
        raise OutputError(f"{manifest_path}: not valid JSON ({exc}); the run is damaged") from exc
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise OutputError(
            f"{manifest_path}: no format_version; this is not an mf-dist table manifest, "
            "or one written before tables were versioned; re-run the pipeline to publish it again"
        )
    version = manifest["format_version"]
    if version != FORMAT_VERSION:
        raise OutputError(
            f"{manifest_path}: table format version {version!r}, but this mf-dist reads version "
            f"{FORMAT_VERSION}; read it with the mf-dist release that wrote it (see docs/tables.md, "
            "'Versions'), or re-run the pipeline with this one"
        )
    return manifest


def read_published(
    path: str | Path, table: str = "items", storage_options: dict[str, Any] | None = None
) -> tuple[pa.Table, dict[str, Any], Path]:
    """(rows, manifest, run directory) of a published table, read from the files the manifest lists.

    Reading the listed files rather than the directory ignores anything else
    that lands there; the row count is checked against the manifest. For a
    URL the run directory returned is the run's URL (a string).
    """
    if is_remote(path):
        return _read_published_remote(str(path), table, storage_options)
    run_dir = resolve_run_dir(local_path(path), table)
    manifest = read_manifest(run_dir)
    names = [entry["name"] for entry in manifest.get("files", [])]
    missing = [name for name in names if not (run_dir / name).is_file()]
    if missing or not names:
        raise OutputError(f"{run_dir}: the manifest lists files that are not there: {missing or '(none)'}")
    rows = pa.concat_tables([pq.read_table(run_dir / name) for name in names])
    if rows.num_rows != manifest.get("row_count"):
        raise OutputError(
            f"{run_dir}: {rows.num_rows} rows in the files, {manifest.get('row_count')} in the manifest; "
            "the run is damaged"
        )
    return rows, manifest, run_dir


def _read_published_remote(
    url: str, table: str, storage_options: dict[str, Any] | None
) -> tuple[pa.Table, dict[str, Any], Any]:
    storage_options = _options(url, storage_options)
    run_url = resolve_remote_run(url, table, storage_options)
    manifest = read_manifest(run_url, storage_options)
    filesystem, run_path = resolve(run_url, storage_options)
    names = [entry["name"] for entry in manifest.get("files", [])]
    with storage_errors(run_url, OutputError):
        missing = [name for name in names if not filesystem.isfile(join(run_path, name))]
        if missing or not names:
            raise OutputError(
                f"{run_url}: the manifest lists files that are not there: {missing or '(none)'}"
            )
        rows = pa.concat_tables(
            [pq.read_table(join(run_path, name), filesystem=filesystem) for name in names]
        )
    if rows.num_rows != manifest.get("row_count"):
        raise OutputError(
            f"{run_url}: {rows.num_rows} rows in the files, {manifest.get('row_count')} in the manifest; "
            "the run is damaged"
        )
    return rows, manifest, run_url


@dataclass(frozen=True)
class Embeddings:
    """One published embedding table in memory.

    ``ids[i]`` is the original id of row ``i`` of ``vectors`` (and of
    ``bias``); rows are in the table's order.
    """

    ids: np.ndarray
    """(n,) the original ids: int64, or object (str) for string ids."""
    vectors: np.ndarray
    """(n, rank) float32."""
    bias: np.ndarray | None
    """(n,) float32 for the explicit model, else None."""
    manifest: dict[str, Any]
    """The run's ``_manifest.json`` (model, rank, metrics, loss history, ``global_mean`` ...)."""
    path: Path | str
    """The run directory that was read (its URL, a string, for a table on an object store)."""

    @property
    def rank(self) -> int:
        return self.vectors.shape[1]

    def __len__(self) -> int:
        return len(self.ids)

    def to_torch(self, device: str | torch.device | None = None) -> torch.Tensor:
        """``vectors`` as an (n, rank) float32 tensor; shares memory with ``vectors`` on the CPU."""
        import torch

        tensor = torch.from_numpy(self.vectors)
        return tensor if device is None else tensor.to(device)


def read_embeddings(
    path: str | Path, table: str = "items", storage_options: dict[str, Any] | None = None
) -> Embeddings:
    """Read the current (or a given) run of an embedding table.

    ``path`` is an output directory (then ``table`` picks ``items`` or
    ``users``), a table directory such as ``out/items`` (LATEST is followed) or
    a run directory, or the URL of one of them (``s3://bucket/out``; the
    store's credentials come from its standard chain, other settings from
    ``storage_options``). Raises :class:`~mf_dist.errors.OutputError` when the path
    holds no table, the table is damaged or its format version is not this
    code's.
    """
    rows, manifest, run_dir = read_published(path, table, storage_options)
    id_column = manifest.get("id_column")
    if "embedding" not in rows.column_names or id_column not in rows.column_names:
        raise OutputError(
            f"{run_dir}: a {manifest.get('table')!r} table, not an embedding table "
            f"(columns: {', '.join(rows.column_names)})"
        )
    rank = int(manifest["rank"])
    embedding = rows["embedding"].combine_chunks()
    # flatten() honours slice offsets; .values would not. The copy makes the
    # array writable (Arrow's buffers are read-only) and frees the Arrow table.
    vectors = np.array(embedding.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    bias = np.array(rows["bias"].to_numpy(), dtype=np.float32) if "bias" in rows.column_names else None
    return Embeddings(
        ids=rows[id_column].to_numpy(),
        vectors=vectors.reshape(rows.num_rows, rank),
        bias=bias,
        manifest=manifest,
        path=run_dir,
    )
