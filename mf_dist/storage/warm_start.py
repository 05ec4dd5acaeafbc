"""Warm start: the factors of a published run, re-aligned to today's ids.

Rows are matched by id value, not by index: items that kept their id keep
their vector (and bias), new ids start fresh with the spread of the matched
vectors, and ids that vanished are dropped. The aligned blocks are written
under the work directory as an ordinary factor table, which the trainers
load like a checkpoint.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pyarrow as pa

from mf_dist.errors import ConfigError
from mf_dist.storage.factor_files import FactorTable, block_seed, write_factor_block
from mf_dist.storage.schema import FORMAT_VERSION
from mf_dist.storage.store import is_remote, join, read_bytes, read_table

logger = logging.getLogger(__name__)


PublishedFactors = tuple[pd.Series, np.ndarray, np.ndarray | None, dict]


def read_published(output: str, table: str) -> PublishedFactors | None:
    """ids, vectors (n × k float32), biases or None and the manifest of the current run of a table.

    ``output`` is a path or a URL.
    """
    try:
        run_id = read_bytes(join(output, table, "LATEST")).decode().strip()
    except FileNotFoundError:
        return None
    run = join(output, table, "runs", run_id)
    manifest = json.loads(read_bytes(join(run, "_manifest.json")))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"--init-from {output}: {run} has table format {manifest.get('format_version')}, "
            f"this version reads {FORMAT_VERSION}"
        )
    if is_remote(run):
        # No directory listing to trust on a store: the manifest names the parts.
        data = pa.concat_tables([read_table(join(run, entry["name"])) for entry in manifest["files"]])
    else:
        data = read_table(run)
    id_column = manifest["id_column"]
    vectors = data["embedding"].combine_chunks().flatten().to_numpy().reshape(len(data), -1)
    bias = data["bias"].to_numpy() if "bias" in data.column_names else None
    return data[id_column].to_pandas(), vectors.astype(np.float32), bias, manifest


def align_published_table(
    output: str,
    layout: FactorTable,
    id_map_path: str,
    id_column: str,
    seed: int,
    side: int,
) -> tuple[FactorTable, int] | None:
    """Write ``layout``'s blocks from the run published under ``output``; ``None`` if it has no such table.

    Returns the written table and how many of today's ids it matched.
    """
    published = read_published(output, layout.name)
    if published is None:
        return None
    ids, vectors, bias, _ = published
    if vectors.shape[1] != layout.rank:
        raise ConfigError(
            f"--init-from {output}: table {layout.name} has rank {vectors.shape[1]} but this run has "
            f"rank {layout.rank}; use --rank {vectors.shape[1]} or start without --init-from"
        )
    today = read_table(id_map_path, columns=["index", id_column]).to_pandas()
    position = pd.Series(np.arange(len(ids)), index=pd.Index(ids))
    matched = position.reindex(today[id_column].to_numpy()).to_numpy()
    found = ~np.isnan(matched)
    spread = float(vectors.std()) if len(vectors) else 0.1
    table = layout.model_copy()
    for block, start, stop in table.grid:
        generator = np.random.default_rng(block_seed(seed, 0, side, block))
        block_vectors = generator.normal(0.0, spread, size=(stop - start, layout.rank)).astype(np.float32)
        block_bias = np.zeros(stop - start, dtype=np.float32) if layout.has_bias else None
        hit = found[start:stop]
        rows = matched[start:stop][hit].astype(np.int64)
        block_vectors[hit] = vectors[rows]
        if block_bias is not None and bias is not None:
            block_bias[hit] = bias[rows]
        write_factor_block(table, block, block_vectors, block_bias)
    return table, int(found.sum())
