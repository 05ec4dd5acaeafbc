"""Parquet schemas of the work directory and of the published tables.

The published tables are a contract with downstream readers; any change to
their layout bumps :data:`FORMAT_VERSION`.

Work directory (intermediate, owned by the pipeline)::

    <work>/ingest/users.parquet         index:int32, user_id, n_ratings:int64, n_likes:int64
    <work>/ingest/items.parquet         index:int32, item_id, n_ratings:int64, n_likes:int64
    <work>/ingest/ratings/block-P.parquet   user:int32, item:int32, rating:float32
    <work>/ingest/summary.json
    <work>/cooccurrence/tiles/...       X = SᵀS tiles (b <= c), diagonal.parquet, summary.json
    <work>/train/<model>/...            factor blocks (.npy), summary.json

Published table (``<output>/<table>/runs/<run_id>/part-*.parquet``)::

    <id column>   int64 or string, the original id
    embedding     fixed_size_list<float32>[rank]
    bias          float32 (explicit model only)

Neighbours table (``<output>/neighbors/runs/<run_id>/part-*.parquet``), k rows
per item, sorted by item then rank::

    item_id       the items table's id type
    neighbor_id   the items table's id type, never equal to item_id
    score         float32, cosine or dot product of the two embeddings
    rank          int32, 1 = most similar

Recommendations table (``<output>/recommendations/runs/<run_id>/part-*.parquet``),
at most N rows per user, sorted by user (the users table's row order) then rank::

    user_id       the users table's id type
    item_id       the items table's id type
    score         float32, the model's prediction (explicit: the rating, biases included)
    rank          int32, 1 = best

The full contract, with the manifest fields, is docs/tables.md.
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


def neighbors_table_schema(id_type: pa.DataType) -> pa.Schema:
    """Schema of the published ``neighbors`` table; ids have the items table's type."""
    return pa.schema(
        [
            pa.field("item_id", id_type, nullable=False),
            pa.field("neighbor_id", id_type, nullable=False),
            pa.field("score", pa.float32(), nullable=False),
            pa.field("rank", pa.int32(), nullable=False),
        ]
    )


def recommendations_table_schema(user_type: pa.DataType, item_type: pa.DataType) -> pa.Schema:
    """Schema of the published ``recommendations`` table; ids have the users' and items' tables types."""
    return pa.schema(
        [
            pa.field("user_id", user_type, nullable=False),
            pa.field("item_id", item_type, nullable=False),
            pa.field("score", pa.float32(), nullable=False),
            pa.field("rank", pa.int32(), nullable=False),
        ]
    )


def embedding_table_schema(id_column: str, id_type: pa.DataType, rank: int, with_bias: bool) -> pa.Schema:
    """Schema of a published embedding table."""
    fields = [
        pa.field(id_column, id_type, nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), rank), nullable=False),
    ]
    if with_bias:
        fields.append(pa.field("bias", pa.float32(), nullable=False))
    return pa.schema(fields)
