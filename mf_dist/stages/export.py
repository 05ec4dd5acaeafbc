"""Export stage: factor blocks + id maps → Parquet tables, published atomically.

For each table (``items``, and ``users`` for the explicit model)::

    <output>/<table>/runs/<run_id>/part-00000.parquet ...
    <output>/<table>/runs/<run_id>/_manifest.json
    <output>/<table>/runs/<run_id>/_loss_curve.png
    <output>/<table>/LATEST            one line: the current run id

A run is written under ``runs/.<run_id>.partial/``, renamed to
``runs/<run_id>/`` when complete, and only then is ``LATEST`` replaced by one
``os.replace``. A reader that follows ``LATEST`` therefore always sees a
complete table; a crash at any point leaves the previous run current.

On an object store (``--output s3://bucket/prefix``) a run is written straight
under ``runs/<run_id>/`` (parts, picture, manifest last) and published by one
small-object put of ``LATEST`` (see :mod:`mf_dist.storage.publish`).

Reading the current table by hand::

    run = open("out/items/LATEST").read().strip()
    table = pyarrow.parquet.read_table(f"out/items/runs/{run}")
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from distributed import Client
from pydantic import BaseModel

from mf_dist.errors import OutputError
from mf_dist.storage.factor_files import FactorTable, TrainResult
from mf_dist.storage.filesystems import (
    check_bucket,
    is_remote,
    join,
    local_path,
    redacted_options,
    resolve,
    storage_errors,
)
from mf_dist.storage.ingested import IngestResult
from mf_dist.storage.publish import (
    fsync_path,
    move_into_place,
    publish_run,
    publish_run_remote,
    write_manifest,
)
from mf_dist.storage.reader import MANIFEST_FILE
from mf_dist.storage.schema import FORMAT_VERSION, embedding_table_schema
from mf_dist.storage.store import delete_prefix, exists, make_dirs, read_table, storage_options_in_use
from mf_dist.terminal.loss_plot import write_loss_curve_png

# Parts and row groups of about this size: large enough that readers do few
# requests, small enough that one row group fits in a reader's memory.
TARGET_PART_BYTES = 128 * 1024 * 1024

# The leading underscore keeps directory readers (pyarrow, pandas, Spark) from
# taking the picture for a Parquet file, as they already skip _manifest.json.
LOSS_CURVE_FILE = "_loss_curve.png"

PREDICTION_RULE = "rating = global_mean + users.bias + items.bias + dot(users.embedding, items.embedding)"


class PublishedTable(BaseModel):
    name: str
    path: str
    run_id: str
    rows: int
    files: list[str]


class ExportResult(BaseModel):
    run_id: str
    tables: list[PublishedTable]


def write_part(
    table: FactorTable,
    blocks: list[int],
    id_map_path: str,
    id_column: str,
    id_type: str,
    path: str,
    storage_options: dict[str, Any] | None = None,
) -> int:
    """Write the rows of ``blocks`` (consecutive) as one Parquet file; returns its row count.

    ``path`` may be an object-store URL; the worker opens it with ``storage_options``
    and the credentials of its own environment.
    """
    start = table.grid.bounds(blocks[0])[0]
    stop = table.grid.bounds(blocks[-1])[1]
    ids = read_table(
        id_map_path, columns=[id_column], filters=[("index", ">=", start), ("index", "<", stop)]
    )[id_column]
    vectors, biases = [], []
    for block in blocks:
        block_vectors, block_bias = table.read_block(block)
        vectors.append(block_vectors)
        biases.append(block_bias)
    flat = np.concatenate(vectors).astype(np.float32, copy=False)
    if len(ids) != len(flat):
        raise OutputError(f"{id_map_path}: {len(ids)} ids for {len(flat)} factor rows of {table.name}")
    schema = embedding_table_schema(id_column, pa.type_for_alias(id_type), table.rank, table.has_bias)
    columns = [
        ids.cast(schema.field(id_column).type),
        pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), table.rank),
    ]
    if table.has_bias:
        columns.append(pa.array(np.concatenate(biases).astype(np.float32)))
    rows = pa.Table.from_arrays(columns, schema=schema)
    if is_remote(path):
        filesystem, inside = resolve(path, storage_options)
        with storage_errors(path, OutputError):
            pq.write_table(rows, inside, filesystem=filesystem, row_group_size=len(flat))
        return len(flat)
    pq.write_table(rows, path, row_group_size=len(flat))
    fsync_path(path)
    return len(flat)


def part_plan(table: FactorTable) -> list[list[int]]:
    """Consecutive row blocks grouped into parts of about :data:`TARGET_PART_BYTES`."""
    bytes_per_row = 4 * table.rank + 16
    blocks_per_part = max(1, TARGET_PART_BYTES // (bytes_per_row * table.block_size))
    blocks = list(range(table.grid.n_blocks))
    return [blocks[i : i + blocks_per_part] for i in range(0, len(blocks), blocks_per_part)]


def export_tables(
    client: Client,
    train: TrainResult,
    ingest: IngestResult,
    output: str | Path,
    *,
    run_id: str,
    config: dict[str, Any],
    extra_manifest: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    publish: bool = True,
) -> ExportResult:
    """Write every trained table under ``runs/<run_id>/`` and then publish them.

    All tables are written completely before the first ``LATEST`` moves, so a
    failure while writing leaves every table on its previous run. With
    ``publish=False`` the runs are moved into place but no ``LATEST`` moves:
    the caller publishes them with :func:`publish_tables`, after the tables
    derived from them (the flow's ``neighbors`` and ``recommendations``).
    """
    if is_remote(str(output)):
        return _export_remote(
            client, train, ingest, str(output), run_id, config, extra_manifest, storage_options or {}, publish
        )
    output = Path(local_path(output))
    written: list[tuple[Path, Path, PublishedTable]] = []
    try:
        for table in train.tables:
            written.append(_write_table(client, table, train, ingest, output, run_id, config, extra_manifest))
    except OSError as exc:
        for _, partial, _ in written:
            delete_prefix(partial)
        raise OutputError(f"cannot write the output tables under {output}: {exc}") from exc
    for table_dir, partial, _ in written:
        move_into_place(partial, table_dir / "runs" / run_id)
    if publish:
        for table_dir, _, _ in written:
            publish_run(table_dir, run_id)
    return ExportResult(run_id=run_id, tables=[published for _, _, published in written])


def publish_tables(
    output: str | Path, tables: list[str], run_id: str, storage_options: dict[str, Any] | None = None
) -> None:
    """Point each table's ``LATEST`` at ``run_id`` (already in place under ``runs/``), in the given order.

    One ``LATEST`` after the other: the commit of a run whose tables were
    all written, and derived ones computed, before the first moves. On an
    object store a run is complete when its manifest is there (written last).
    """
    if is_remote(str(output)):
        for table in tables:
            manifest = join(str(output), table, "runs", run_id, MANIFEST_FILE)
            with storage_errors(manifest, OutputError), storage_options_in_use([manifest], storage_options):
                complete = exists(manifest)
            if not complete:
                raise OutputError(f"{manifest}: missing; cannot publish run {run_id} of {table}")
        for table in tables:
            publish_run_remote(join(str(output), table), run_id, storage_options)
        return
    for table in tables:
        run_dir = Path(output) / table / "runs" / run_id
        if not exists(run_dir):
            raise OutputError(f"{run_dir}: missing; cannot publish run {run_id} of {table}")
    for table in tables:
        publish_run(Path(output) / table, run_id)


def _export_remote(
    client: Client,
    train: TrainResult,
    ingest: IngestResult,
    output: str,
    run_id: str,
    config: dict[str, Any],
    extra_manifest: dict[str, Any] | None,
    storage_options: dict[str, Any],
    publish: bool,
) -> ExportResult:
    """:func:`export_tables` on an object store: runs/<run_id>/ per table, manifests last, then LATESTs.

    With ``publish=False`` no ``LATEST`` moves (see :func:`publish_tables`).
    """
    filesystem, _ = resolve(output, storage_options)
    check_bucket(output, storage_options, OutputError)
    written: list[tuple[str, PublishedTable]] = []
    try:
        with storage_errors(output, OutputError):
            for table in train.tables:
                table_url = join(output, table.name)
                run_url = join(table_url, "runs", run_id)
                manifest, published = _write_parts(
                    client, table, train, ingest, run_url, run_id, config, extra_manifest, storage_options
                )
                with tempfile.TemporaryDirectory() as scratch:
                    picture = write_loss_curve_png(
                        train.history,
                        Path(scratch) / LOSS_CURVE_FILE,
                        f"{train.model}, rank {train.rank}: {table.name}, run {run_id}",
                    )
                    filesystem.put_file(
                        str(picture), resolve(join(run_url, LOSS_CURVE_FILE), storage_options)[1]
                    )
                filesystem.pipe_file(
                    resolve(join(run_url, MANIFEST_FILE), storage_options)[1],
                    json.dumps(manifest, indent=2, default=str).encode(),
                )
                written.append((table_url, published))
    except BaseException:
        # Nothing was published; take the unfinished runs away (best effort).
        for table in train.tables:
            run_path = resolve(join(output, table.name, "runs", run_id), storage_options)[1]
            with contextlib.suppress(Exception):
                filesystem.rm(run_path, recursive=True)
        raise
    if publish:
        for table_url, _ in written:
            publish_run_remote(table_url, run_id, storage_options)
    return ExportResult(run_id=run_id, tables=[published for _, published in written])


def _write_parts(
    client: Client,
    table: FactorTable,
    train: TrainResult,
    ingest: IngestResult,
    run_location: str,
    run_id: str,
    config: dict[str, Any],
    extra_manifest: dict[str, Any] | None,
    storage_options: dict[str, Any] | None,
) -> tuple[dict[str, Any], PublishedTable]:
    """Write a table's parts (on the workers) under ``run_location``; returns its manifest and record."""
    if table.name == "users":
        id_map, id_column, id_type = ingest.users_path, "user_id", ingest.user_id_type
    else:
        id_map, id_column, id_type = ingest.items_path, "item_id", ingest.item_id_type
    plan = part_plan(table)
    names = [f"part-{index:05d}.parquet" for index in range(len(plan))]
    rows = client.gather(
        [
            client.submit(
                write_part,
                table,
                blocks,
                str(id_map),
                id_column,
                id_type,
                join(run_location, name),
                storage_options,
            )
            for blocks, name in zip(plan, names, strict=True)
        ]
    )
    manifest = {
        "format_version": FORMAT_VERSION,
        "run_id": run_id,
        "table": table.name,
        "model": train.model,
        "solver": train.solver,
        "rank": train.rank,
        "hyperparameters": train.settings,
        "epochs_run": train.epochs,
        "stopped_early": train.stopped_early,
        "id_column": id_column,
        "id_type": id_type,
        "columns": [
            field.name
            for field in embedding_table_schema(
                id_column, pa.type_for_alias(id_type), table.rank, table.has_bias
            )
        ],
        "row_count": int(sum(rows)),
        "files": [{"name": name, "rows": int(count)} for name, count in zip(names, rows, strict=True)],
        "metrics": {"final_loss": train.final_loss, **train.history[-1].metrics},
        "loss_history": [record.model_dump() for record in train.history],
        "loss_curve": LOSS_CURVE_FILE,
        "input_fingerprint": ingest.fingerprint,
        "input_rows": ingest.n_ratings,
        "device": train.device,
        "config": _without_secrets(config),
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
    }
    if train.global_mean is not None:
        manifest["global_mean"] = train.global_mean
        manifest["prediction_rule"] = PREDICTION_RULE
    manifest.update(extra_manifest or {})
    published = PublishedTable(
        name=table.name,
        path=join(str(run_location).rsplit("/", 2)[0], "runs", run_id),
        run_id=run_id,
        rows=int(sum(rows)),
        files=names,
    )
    return manifest, published


def _without_secrets(config: dict[str, Any]) -> dict[str, Any]:
    """The run config for a manifest: ``storage_options`` with secret-looking values masked."""
    if config.get("storage_options"):
        return {**config, "storage_options": redacted_options(config["storage_options"])}
    return config


def _write_table(
    client: Client,
    table: FactorTable,
    train: TrainResult,
    ingest: IngestResult,
    output: Path,
    run_id: str,
    config: dict[str, Any],
    extra_manifest: dict[str, Any] | None,
) -> tuple[Path, Path, PublishedTable]:
    table_dir = output / table.name
    partial = table_dir / "runs" / f".{run_id}.partial"
    if exists(partial):
        # An OSError, as mkdir(exist_ok=False) raised: the caller cleans up and reports it.
        raise FileExistsError(f"{partial} exists already")
    make_dirs(partial)
    manifest, published = _write_parts(
        client, table, train, ingest, str(partial), run_id, config, extra_manifest, None
    )
    loss_curve = write_loss_curve_png(
        train.history,
        partial / LOSS_CURVE_FILE,
        f"{train.model}, rank {train.rank}: {table.name}, run {run_id}",
    )
    fsync_path(loss_curve)
    write_manifest(partial, manifest)
    fsync_path(partial)
    published = published.model_copy(update={"path": str(table_dir / "runs" / run_id)})
    return table_dir, partial, published
