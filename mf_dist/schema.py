"""Parquet schemas of the work directory and of the published tables.

The published tables are a contract with downstream readers; any change to
their layout bumps :data:`FORMAT_VERSION`.

Work directory (intermediate, owned by the pipeline)::

    <work>/ingest/users.parquet         index:int32, user_id, n_ratings:int64
    <work>/ingest/items.parquet         index:int32, item_id, n_ratings:int64, n_likes:int64
    <work>/ingest/ratings/block-P.parquet   user:int32, item:int32, rating:float32
    <work>/ingest/summary.json
    <work>/cooccurrence/tiles/...       X = SᵀS tiles (b <= c), diagonal.parquet, summary.json
    <work>/train/<model>/...            factor blocks (.npy), summary.json

Published table (``<output>/<table>/runs/<run_id>/part-*.parquet``)::

    <id column>   int64 or string, the original id
    embedding     fixed_size_list<float32>[rank]
    bias          float32 (explicit model only)
"""

from __future__ import annotations

import pyarrow as pa

FORMAT_VERSION = 1

INGEST_DIR = "ingest"
COOCCURRENCE_DIR = "cooccurrence"
TRAIN_DIR = "train"

RATINGS_SCHEMA = pa.schema(
    [
        pa.field("user", pa.int32(), nullable=False),
        pa.field("item", pa.int32(), nullable=False),
        pa.field("rating", pa.float32(), nullable=False),
    ]
)

TILE_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int32(), nullable=False),
        pa.field("col", pa.int32(), nullable=False),
        pa.field("count", pa.int32(), nullable=False),
    ]
)


def ratings_block_name(block: int) -> str:
    return f"block-{block:05d}.parquet"


def embedding_table_schema(id_column: str, id_type: pa.DataType, rank: int, with_bias: bool) -> pa.Schema:
    """Schema of a published embedding table."""
    fields = [
        pa.field(id_column, id_type, nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), rank), nullable=False),
    ]
    if with_bias:
        fields.append(pa.field("bias", pa.float32(), nullable=False))
    return pa.schema(fields)
