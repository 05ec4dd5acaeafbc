"""Publishing an embedding table with chosen ids and vectors through the real export stage.

Tests of readers and of the neighbours stage need tables whose every value
they know; training would make the values a surprise. This writes the id
map and factor blocks the way ingest and train do and calls
:func:`mf_dist.stages.export.export_tables` on them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from distributed import Client

from mf_dist.stages.export import ExportResult, export_tables
from mf_dist.storage.factor_files import EpochRecord, FactorTable, TrainResult, write_factor_block
from mf_dist.storage.ingested import IngestResult
from mf_dist.storage.publish import new_run_id

HISTORY = [EpochRecord(epoch=epoch, loss=100.0 / (epoch + 1), seconds=0.01) for epoch in range(5)]


def publish_items(
    client: Client,
    output: Path,
    ids: np.ndarray | list,
    vectors: np.ndarray,
    *,
    bias: np.ndarray | None = None,
    block_size: int = 16,
    run_id: str | None = None,
    history: list[EpochRecord] = HISTORY,
) -> ExportResult:
    """Publish ``vectors`` (n × rank) under ``output/items`` with ``ids`` (int64 or str) as item ids."""
    vectors = np.asarray(vectors, dtype=np.float32)
    id_type = pa.string() if isinstance(ids[0], str) else pa.int64()
    work = output / "_work_published"
    work.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "index": pa.array(np.arange(len(ids), dtype=np.int32)),
                "item_id": pa.array(list(ids), type=id_type),
            }
        ),
        work / "items.parquet",
    )
    table = FactorTable(
        name="items",
        directory=str(work / "factors"),
        n_rows=len(ids),
        block_size=block_size,
        rank=vectors.shape[1],
        has_bias=bias is not None,
    )
    for block in range(table.grid.n_blocks):
        start, stop = table.grid.bounds(block)
        write_factor_block(table, block, vectors[start:stop], None if bias is None else bias[start:stop])
    train = TrainResult(
        model="explicit" if bias is not None else "cooccurrence",
        rank=vectors.shape[1],
        epochs=len(history),
        learning_rate=0.1,
        history=history,
        tables=[table],
        global_mean=3.5 if bias is not None else None,
        device="cpu",
    )
    ingest = IngestResult(
        directory=str(work),
        files=[],
        fingerprint="test",
        n_users=1,
        n_items=len(ids),
        n_ratings=len(ids),
        n_likes=len(ids),
        block_size=block_size,
        implicit=bias is None,
        like_threshold=None,
        global_mean=3.5,
        duplicates_policy="error",
        duplicates_resolved=0,
        user_column="user_id",
        item_column="item_id",
        user_id_type="int64",
        item_id_type=str(id_type),
    )
    return export_tables(
        client, train, ingest, output, run_id=run_id or new_run_id(), config={"model": train.model}
    )
