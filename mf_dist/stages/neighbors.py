"""Neighbours stage: for every item, its k most similar items, as a published table.

The item embedding table is cut into row blocks that stay on the workers (on
the GPU of a worker that has one). For each query block a chain of tasks
walks the candidate blocks in groups: each step scores the query rows
against one group (a block-by-block matmul), masks the item itself and keeps
a running top-k per row with ``torch.topk`` over ``[running, new]``. Memory
per step is O(block² + group × rank); no M × M matrix exists anywhere, and the
driver holds no vectors.

Similarity is ``cosine`` (dot product of L2-normalised vectors; a zero vector
scores 0 with everything) or ``dot`` (the raw inner product, which favours
long vectors, i.e. popular items for the co-occurrence model).

Output, published like the embedding tables (see :mod:`mf_dist.stages.export`)::

    <output>/neighbors/runs/<run_id>/part-*.parquet   item_id, neighbor_id, score, rank
    <output>/neighbors/runs/<run_id>/_manifest.json
    <output>/neighbors/LATEST
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import torch
from distributed import Client, as_completed
from pydantic import BaseModel

from mf_dist.errors import ConfigError, OutputError
from mf_dist.runtime.cluster import compute_device, training_resources
from mf_dist.stages.export import TARGET_PART_BYTES
from mf_dist.storage.publish import new_run_id, publish_run, staged_run, write_manifest
from mf_dist.storage.reader import find_run, output_of_run, read_manifest
from mf_dist.storage.schema import FORMAT_VERSION, neighbors_table_schema
from mf_dist.storage.store import join, read_table, write_table

Metric = Literal["cosine", "dot"]
METRICS: tuple[str, ...] = ("cosine", "dot")
NEIGHBORS_TABLE = "neighbors"

# Candidate blocks scored by one task: enough that a task is not all
# scheduling overhead, few enough that the group fits beside the scores.
CANDIDATE_GROUP_BYTES = 256 * 1024 * 1024

# Below this norm a vector counts as zero for cosine (no direction to compare).
ZERO_NORM = 1e-12


class NeighborsResult(BaseModel):
    """What the neighbours stage published."""

    run_id: str
    path: str
    rows: int
    k: int
    metric: str
    source_path: str
    source_run_id: str
    files: list[str]
    device: str


class BlockSpec(NamedTuple):
    """Rows ``start:stop`` of part file ``part``; ``offset`` is the first row's index in the table."""

    part: int
    start: int
    stop: int
    offset: int


class TopK(NamedTuple):
    """Running top-k of a query block: (rows, k) float32 scores, best first, and int64 table rows."""

    scores: np.ndarray
    rows: np.ndarray


class ResidentBlock:
    """A row block of (normalised, for cosine) item vectors, kept on its worker's device.

    ``offset`` is the table row of the block's first row. A block that has to
    move between workers travels as a NumPy array and lands on the receiving
    worker's device.
    """

    def __init__(self, vectors: np.ndarray, offset: int, device_preference: str) -> None:
        self.offset = offset
        self.device_preference = device_preference
        self.vectors = torch.from_numpy(vectors).to(compute_device(device_preference))

    def __reduce__(self) -> tuple:
        return (ResidentBlock, (self.vectors.cpu().numpy(), self.offset, self.device_preference))

    def __sizeof__(self) -> int:
        return self.vectors.element_size() * self.vectors.nelement()

    def __len__(self) -> int:
        return self.vectors.shape[0]


def load_part_vectors(path: str, rank: int, metric: str) -> np.ndarray:
    """The embedding column of one part file as (rows, rank) float32, L2-normalised for cosine."""
    column = read_table(path, columns=["embedding"])["embedding"].combine_chunks()
    vectors = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    vectors = vectors.reshape(-1, rank)
    if metric == "cosine":
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, ZERO_NORM)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def make_block(part_vectors: np.ndarray, start: int, stop: int, offset: int, device: str) -> ResidentBlock:
    # A copy, so that the block does not keep its whole part file alive.
    return ResidentBlock(part_vectors[start:stop].copy(), offset, device)


def load_ids(paths: list[str], id_column: str) -> pa.Array:
    """The id column of the whole table, in table-row order."""
    return pa.concat_arrays(
        [read_table(path, columns=[id_column])[id_column].combine_chunks() for path in paths]
    )


def fold_candidates(
    running: TopK | None, query: ResidentBlock, candidates: list[ResidentBlock], k: int
) -> TopK:
    """Merge the scores of ``query`` against each block of ``candidates`` into the running top-k.

    An item never counts as its own neighbour: the score of a row against
    itself is set to −inf before the merge. ``running`` is None on the first
    step.
    """
    device = query.vectors.device
    queries = query.vectors
    rows_in_block = len(query)
    if running is None:
        best_scores = torch.full((rows_in_block, k), float("-inf"), device=device)
        best_rows = torch.full((rows_in_block, k), -1, dtype=torch.int64, device=device)
    else:
        best_scores = torch.from_numpy(running.scores).to(device)
        best_rows = torch.from_numpy(running.rows).to(device)
    for candidate in candidates:
        scores = queries @ candidate.vectors.to(device).T  # (query rows, candidate rows)
        first = max(query.offset, candidate.offset)
        last = min(query.offset + rows_in_block, candidate.offset + len(candidate))
        if first < last:
            itself = torch.arange(first, last, device=device)
            scores[itself - query.offset, itself - candidate.offset] = float("-inf")
        # The block's own top-k first, then a merge of two (rows × k) sets: no
        # (rows × block) index matrix is ever built.
        block_scores, block_positions = torch.topk(scores, min(k, len(candidate)), dim=1)
        merged_scores = torch.cat([best_scores, block_scores], dim=1)
        merged_rows = torch.cat([best_rows, block_positions + candidate.offset], dim=1)
        best_scores, positions = torch.topk(merged_scores, k, dim=1, largest=True, sorted=True)
        best_rows = torch.gather(merged_rows, 1, positions)
    return TopK(best_scores.cpu().numpy(), best_rows.cpu().numpy())


def write_neighbors_part(
    path: str, blocks: list[tuple[int, TopK]], ids: pa.Array, id_type: pa.DataType
) -> int:
    """Write the top-k of consecutive query blocks ``(offset, TopK)`` as one Parquet file; returns rows."""
    item_rows = np.concatenate([offset + np.arange(len(top.rows)) for offset, top in blocks])
    neighbor_rows = np.concatenate([top.rows for _, top in blocks])
    scores = np.concatenate([top.scores for _, top in blocks])
    if (neighbor_rows < 0).any() or not np.isfinite(scores).all():
        raise OutputError(f"{path}: some items have fewer neighbours than k, or non-finite scores")
    k = neighbor_rows.shape[1]
    schema = neighbors_table_schema(id_type)
    table = pa.Table.from_arrays(
        [
            ids.take(pa.array(np.repeat(item_rows, k))).cast(id_type),
            ids.take(pa.array(neighbor_rows.reshape(-1))).cast(id_type),
            pa.array(scores.reshape(-1).astype(np.float32)),
            pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), len(item_rows))),
        ],
        schema=schema,
    )
    write_table(table, path, durable=True, row_group_size=table.num_rows)
    return table.num_rows


def describe_device(device_preference: str) -> str:
    return str(compute_device(device_preference))


def plan_blocks(part_rows: list[int], block_size: int) -> list[BlockSpec]:
    """Row blocks of at most ``block_size`` rows that never straddle two part files."""
    blocks, offset = [], 0
    for part, rows in enumerate(part_rows):
        blocks += [
            BlockSpec(part, start, min(start + block_size, rows), offset + start)
            for start in range(0, rows, block_size)
        ]
        offset += rows
    return blocks


def group_consecutive(sizes: list[int], budget: int) -> list[list[int]]:
    """Indexes of consecutive items grouped so that each group's summed size stays within ``budget``.

    An item larger than ``budget`` gets a group of its own.
    """
    groups: list[list[int]] = []
    total = 0
    for index, size in enumerate(sizes):
        if groups and total + size <= budget:
            groups[-1].append(index)
            total += size
        else:
            groups.append([index])
            total = size
    return groups


def item_neighbors(
    client: Client,
    source: str | Path,
    k: int = 10,
    metric: str = "cosine",
    *,
    output: str | Path | None = None,
    block_size: int = 4096,
    run_id: str | None = None,
    device: str = "auto",
    on_block: Callable[[int, int], None] | None = None,
    publish: bool = True,
) -> NeighborsResult:
    """Compute and publish the ``neighbors`` table of an ``items`` embedding table.

    ``source`` is an output directory, the ``items`` table directory or one
    of its run directories, or the URL of one (``s3://bucket/out``); ``output``
    (default: the output directory the items table lives in, a URL too)
    receives ``neighbors/`` (on a store: no rename, the manifest last, see
    :func:`mf_dist.storage.publish.staged_run`). ``k`` is capped at the
    number of items − 1. ``on_block(done, total)`` is called on the driver as
    query blocks finish. With ``publish=False`` the run is moved into place
    but ``LATEST`` is left to the caller (the flow commits all of a run's
    tables together, :func:`mf_dist.stages.export.publish_tables`). Raises
    :class:`ConfigError` for a bad ``k``, ``metric`` or ``block_size`` and
    :class:`OutputError` when the source is not an items table or the output
    cannot be written.
    """
    if metric not in METRICS:
        raise ConfigError(f"unknown similarity {metric!r}; choose one of {', '.join(METRICS)}")
    if k < 1:
        raise ConfigError(f"k must be at least 1 (got {k})")
    if block_size < 1:
        raise ConfigError(f"block size must be at least 1 (got {block_size})")
    source_run = find_run(source, "items")
    manifest = read_manifest(source_run)
    if manifest.get("table") != "items" or "embedding" not in manifest.get("columns", []):
        raise OutputError(f"{source_run}: not an items embedding table (table {manifest.get('table')!r})")
    n_items = int(manifest["row_count"])
    if n_items < 2:
        raise OutputError(f"{source_run}: {n_items} item(s); neighbours need at least two")
    k_effective = min(k, n_items - 1)
    rank = int(manifest["rank"])
    id_column = manifest["id_column"]
    id_type = pa.type_for_alias(manifest["id_type"])
    part_paths = [join(str(source_run), entry["name"]) for entry in manifest["files"]]
    part_rows = [int(entry["rows"]) for entry in manifest["files"]]
    output_dir = output if output is not None else output_of_run(source_run)
    run_id = run_id or new_run_id()
    resources = training_resources(client)

    # Blocks are loaded where their part was read and stay there; only the
    # small running top-k moves between the steps of a chain.
    parts = [client.submit(load_part_vectors, path, rank, metric, pure=False) for path in part_paths]
    specs = plan_blocks(part_rows, block_size)
    blocks = [
        client.submit(
            make_block, parts[spec.part], spec.start, spec.stop, spec.offset, device, resources=resources
        )
        for spec in specs
    ]
    del parts
    ids = client.submit(load_ids, part_paths, id_column, pure=False)
    block_bytes = [4 * rank * (spec.stop - spec.start) for spec in specs]
    candidate_groups = group_consecutive(block_bytes, CANDIDATE_GROUP_BYTES)

    finals = []
    for query in blocks:
        running = None
        for group in candidate_groups:
            running = client.submit(
                fold_candidates,
                running,
                query,
                [blocks[index] for index in group],
                k_effective,
                resources=resources,
                pure=False,
            )
        finals.append(running)
    if on_block is not None:
        for done, _ in enumerate(as_completed(finals), start=1):
            on_block(done, len(finals))

    # Output parts of about TARGET_PART_BYTES: a block's rows are few bytes
    # each, so one file per block would make many tiny files.
    bytes_per_row = 2 * (8 if pa.types.is_integer(id_type) else 24) + 8
    block_output_bytes = [bytes_per_row * k_effective * (spec.stop - spec.start) for spec in specs]
    output_groups = group_consecutive(block_output_bytes, TARGET_PART_BYTES)
    names = [f"part-{index:05d}.parquet" for index in range(len(output_groups))]
    table_dir = join(str(output_dir), NEIGHBORS_TABLE)
    with staged_run(table_dir, run_id, "the neighbors table") as partial:
        rows = client.gather(
            [
                client.submit(
                    write_neighbors_part,
                    join(str(partial), name),
                    [(specs[index].offset, finals[index]) for index in group],
                    ids,
                    id_type,
                    pure=False,
                )
                for group, name in zip(output_groups, names, strict=True)
            ]
        )
        compute_on = client.submit(describe_device, device, resources=resources, pure=False).result()
        neighbors_manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "run_id": run_id,
            "table": NEIGHBORS_TABLE,
            "metric": metric,
            "k": k_effective,
            "k_requested": k,
            "id_column": "item_id",
            "id_type": manifest["id_type"],
            "columns": neighbors_table_schema(id_type).names,
            "row_count": int(sum(rows)),
            "files": [{"name": name, "rows": int(count)} for name, count in zip(names, rows, strict=True)],
            "source": {
                "table": "items",
                "path": str(source_run),
                "run_id": manifest["run_id"],
                "model": manifest.get("model"),
                "rank": rank,
            },
            "block_size": block_size,
            "device": compute_on,
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
        }
        write_manifest(partial, neighbors_manifest)
    if publish:
        publish_run(table_dir, run_id)
    return NeighborsResult(
        run_id=run_id,
        path=join(table_dir, "runs", run_id),
        rows=int(sum(rows)),
        k=k_effective,
        metric=metric,
        source_path=str(source_run),
        source_run_id=manifest["run_id"],
        files=names,
        device=compute_on,
    )
