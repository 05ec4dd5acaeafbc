"""The output contract (docs/tables.md) as downstream readers see it.

Tables come from the real stages (ingest → co-occurrence → train → export)
on tiny data and are read back with pyarrow, pandas, DuckDB, Polars and
:func:`mf_dist.read_embeddings`; ids, dimensions and values must equal the
trained factors exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mf_dist import read_embeddings
from mf_dist.errors import OutputError
from mf_dist.stages.export import LOSS_CURVE_FILE, TARGET_PART_BYTES, part_plan
from mf_dist.storage.factor_files import FactorTable
from mf_dist.storage.schema import (
    FORMAT_VERSION,
    embedding_table_schema,
    neighbors_table_schema,
    recommendations_table_schema,
)
from tests.support.paths import REPO
from tests.support.published import publish_items

# The published schemas of each format version, written out by hand: a change
# to mf_dist/storage/schema.py that does not bump FORMAT_VERSION fails here.
SCHEMAS_BY_VERSION = {
    1: {
        "items (cooccurrence, rank 4)": (
            embedding_table_schema("item_id", pa.int64(), 4, with_bias=False),
            pa.schema(
                [
                    pa.field("item_id", pa.int64(), nullable=False),
                    pa.field("embedding", pa.list_(pa.float32(), 4), nullable=False),
                ]
            ),
        ),
        "users (explicit, rank 4, string ids)": (
            embedding_table_schema("user_id", pa.string(), 4, with_bias=True),
            pa.schema(
                [
                    pa.field("user_id", pa.string(), nullable=False),
                    pa.field("embedding", pa.list_(pa.float32(), 4), nullable=False),
                    pa.field("bias", pa.float32(), nullable=False),
                ]
            ),
        ),
        "neighbors": (
            neighbors_table_schema(pa.int64()),
            pa.schema(
                [
                    pa.field("item_id", pa.int64(), nullable=False),
                    pa.field("neighbor_id", pa.int64(), nullable=False),
                    pa.field("score", pa.float32(), nullable=False),
                    pa.field("rank", pa.int32(), nullable=False),
                ]
            ),
        ),
        "recommendations (int users, string items)": (
            recommendations_table_schema(pa.int64(), pa.string()),
            pa.schema(
                [
                    pa.field("user_id", pa.int64(), nullable=False),
                    pa.field("item_id", pa.string(), nullable=False),
                    pa.field("score", pa.float32(), nullable=False),
                    pa.field("rank", pa.int32(), nullable=False),
                ]
            ),
        ),
    }
}


class Known:
    """A table published through the export stage from values the test chose (the truth)."""

    def __init__(self, output: Path, ids: list, vectors: np.ndarray, bias: np.ndarray | None) -> None:
        self.output, self.ids, self.vectors, self.bias = output, ids, vectors, bias

    @property
    def run_dir(self) -> Path:
        return self.output / "items" / "runs" / (self.output / "items" / "LATEST").read_text().strip()

    @property
    def files(self) -> str:
        return f"{self.run_dir}/*.parquet"


@pytest.fixture(
    params=["int64 ids, one file", "string ids with bias, several files"],
    ids=["int-ids", "string-ids-bias-parts"],
)
def known(request, client, tmp_path, monkeypatch) -> Known:
    rng = np.random.default_rng(5)
    n = 45
    # Values chosen to catch a lossy path: subnormals, signed zero, extremes of float32.
    vectors = rng.normal(size=(n, 3)).astype(np.float32)
    vectors[0] = [np.float32(1e-45), -0.0, np.finfo(np.float32).max]
    vectors[1] = [np.finfo(np.float32).tiny, np.float32(1 / 3), -np.finfo(np.float32).max]
    if request.param.startswith("int64"):
        ids: list = [int(i) for i in rng.choice(2**40, size=n, replace=False)]
        bias = None
    else:
        monkeypatch.setattr("mf_dist.stages.export.TARGET_PART_BYTES", 1000)
        ids = [f"sku-{i}" for i in rng.choice(100_000, size=n, replace=False)]
        bias = rng.normal(size=n).astype(np.float32)
    publish_items(client, tmp_path, ids, vectors, bias=bias, block_size=8)
    return Known(tmp_path, ids, vectors, bias)


def test_pyarrow_reads_the_run_directory_exactly(known):
    rows = pq.read_table(known.run_dir)  # the whole directory, as the docs show
    assert rows.column_names == ["item_id", "embedding"] + (["bias"] if known.bias is not None else [])
    assert rows["item_id"].to_pylist() == known.ids
    read = rows["embedding"].combine_chunks().flatten().to_numpy().reshape(len(known.ids), -1)
    assert read.dtype == np.float32
    np.testing.assert_array_equal(read, known.vectors)
    assert np.signbit(read[0, 1])  # -0.0 stays negative zero
    if known.bias is not None:
        np.testing.assert_array_equal(rows["bias"].to_numpy(), known.bias)


def test_pandas_reads_exactly(known):
    frame = pd.read_parquet(known.run_dir)
    assert frame["item_id"].tolist() == known.ids
    np.testing.assert_array_equal(np.stack(frame["embedding"].to_numpy()), known.vectors)
    if known.bias is not None:
        assert frame["bias"].dtype == np.float32
        np.testing.assert_array_equal(frame["bias"].to_numpy(), known.bias)


def test_duckdb_reads_exactly(known):
    described = {
        row[0]: row[1] for row in duckdb.sql(f"DESCRIBE FROM read_parquet('{known.files}')").fetchall()
    }
    assert described["item_id"] == ("VARCHAR" if isinstance(known.ids[0], str) else "BIGINT")
    # Parquet has no fixed-size list; DuckDB sees a FLOAT list (docs/tables.md shows the cast).
    assert described["embedding"] == "FLOAT[]"
    lengths = duckdb.sql(f"SELECT DISTINCT len(embedding) FROM read_parquet('{known.files}')").fetchall()
    assert lengths == [(3,)]
    rows = duckdb.sql(f"SELECT * FROM read_parquet('{known.files}')").fetchall()
    assert [row[0] for row in rows] == known.ids
    # DuckDB hands FLOATs out as Python floats: exact widenings of the float32 values.
    np.testing.assert_array_equal(np.array([row[1] for row in rows], dtype=np.float64), known.vectors)
    if known.bias is not None:
        assert described["bias"] == "FLOAT"
        np.testing.assert_array_equal(np.array([row[2] for row in rows]), known.bias)


def test_polars_reads_exactly(known):
    frame = pl.read_parquet(known.files)
    assert frame.schema["embedding"] == pl.Array(pl.Float32, 3)
    assert frame["item_id"].to_list() == known.ids
    np.testing.assert_array_equal(frame["embedding"].to_numpy(), known.vectors)
    if known.bias is not None:
        np.testing.assert_array_equal(frame["bias"].to_numpy(), known.bias)


def test_read_embeddings_follows_latest_and_matches_exactly(known):
    for path in (known.output, known.output / "items", known.run_dir):
        embeddings = read_embeddings(path)
        assert embeddings.ids.tolist() == known.ids
        assert embeddings.vectors.dtype == np.float32 and embeddings.vectors.shape == (len(known.ids), 3)
        assert embeddings.vectors.flags.writeable, "callers normalise in place"
        np.testing.assert_array_equal(embeddings.vectors, known.vectors)
        if known.bias is None:
            assert embeddings.bias is None
        else:
            np.testing.assert_array_equal(embeddings.bias, known.bias)
        assert embeddings.path == known.run_dir and embeddings.manifest["table"] == "items"
        tensor = embeddings.to_torch()
        assert tensor.dtype == torch.float32 and tuple(tensor.shape) == known.vectors.shape
        np.testing.assert_array_equal(tensor.numpy(), known.vectors)


def test_manifest_lists_the_files_rows_and_loss_curve(known):
    manifest = json.loads((known.run_dir / "_manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["loss_curve"] == LOSS_CURVE_FILE
    assert (known.run_dir / LOSS_CURVE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = [entry["name"] for entry in manifest["files"]]
    assert sorted(path.name for path in known.run_dir.glob("*.parquet")) == names
    assert sum(entry["rows"] for entry in manifest["files"]) == manifest["row_count"] == len(known.ids)
    for name in names:
        assert pq.ParquetFile(known.run_dir / name).metadata.num_row_groups == 1
    if known.bias is None:
        assert len(names) == 1, "a small table is one file, not one per block"


def test_large_tables_are_cut_into_parts_of_about_the_target_size():
    table = FactorTable(
        name="items", directory="unused", n_rows=10_000_000, block_size=4096, rank=128, has_bias=False
    )
    plan = part_plan(table)
    bytes_per_row = 4 * 128 + 16
    sizes = [sum(min(4096, table.n_rows - block * 4096) for block in part) * bytes_per_row for part in plan]
    assert [block for part in plan for block in part] == list(range(table.grid.n_blocks))
    assert max(sizes) <= TARGET_PART_BYTES
    assert min(sizes[:-1]) >= TARGET_PART_BYTES // 2
    assert 20 <= len(plan) <= 60


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: {**m, "format_version": FORMAT_VERSION + 1}, f"reads version {FORMAT_VERSION}"),
        (lambda m: {k: v for k, v in m.items() if k != "format_version"}, "no format_version"),
    ],
)
def test_a_manifest_of_another_format_is_refused(client, tmp_path, damage, message):
    publish_items(client, tmp_path, [1, 2], np.ones((2, 2), np.float32))
    run_dir = next((tmp_path / "items" / "runs").iterdir())
    manifest_path = run_dir / "_manifest.json"
    manifest_path.write_text(json.dumps(damage(json.loads(manifest_path.read_text()))))
    with pytest.raises(OutputError, match=message):
        read_embeddings(tmp_path / "items")


def test_paths_that_hold_no_current_table_are_refused(client, tmp_path):
    with pytest.raises(OutputError, match="no such directory"):
        read_embeddings(tmp_path / "absent")
    with pytest.raises(OutputError, match="not an mf-dist table"):
        read_embeddings(tmp_path)
    publish_items(client, tmp_path, [1, 2], np.ones((2, 2), np.float32))
    shutil.rmtree(next((tmp_path / "items" / "runs").iterdir()))
    with pytest.raises(OutputError, match="names run"):
        read_embeddings(tmp_path / "items")


@pytest.mark.parametrize("name", sorted(SCHEMAS_BY_VERSION.get(FORMAT_VERSION, {})))
def test_the_schema_of_this_format_version_is_unchanged(name):
    assert FORMAT_VERSION in SCHEMAS_BY_VERSION, (
        f"FORMAT_VERSION is {FORMAT_VERSION}: write its schemas into SCHEMAS_BY_VERSION and docs/tables.md"
    )
    produced, pinned = SCHEMAS_BY_VERSION[FORMAT_VERSION][name]
    assert produced.equals(pinned), (
        f"the {name} schema changed without a FORMAT_VERSION bump; bump it and document the change"
    )


def test_the_documented_contract_is_this_version():
    text = (REPO / "docs" / "tables.md").read_text()
    assert f"Current format version: **{FORMAT_VERSION}**" in text
    for column in ("item_id", "user_id", "embedding", "bias", "neighbor_id", "score", "rank", "LATEST"):
        assert f"`{column}`" in text
