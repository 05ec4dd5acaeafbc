"""The observed entries of the ratings matrix, kept on the workers from both sides.

ALS alternates between solving every user row (it needs each user block's
entries with global item indices) and every item row (each item block's
entries with global user indices). Both views are built once at the start of
training and stay on the workers as futures; only factor blocks travel after
that.

Work functions here run on the workers; they take and return CPU tensors.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from distributed import Client, Future
from torch import Tensor

from mf_dist.blocks import BlockGrid
from mf_dist.ingest import IngestResult
from mf_dist.solvers.gradient import RowBlock


@dataclass
class SideEntries:
    """One row block's entries: local ``rows`` (sorted), global ``cols`` of the other side, ``values``."""

    rows: Tensor
    cols: Tensor
    values: Tensor
    n_rows: int

    def __sizeof__(self) -> int:
        return 20 * len(self.values) + 64


def _sorted_entries(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n_rows: int) -> SideEntries:
    order = np.lexsort((cols, rows))
    return SideEntries(
        rows=torch.from_numpy(rows[order].astype(np.int64)),
        cols=torch.from_numpy(cols[order].astype(np.int64)),
        values=torch.from_numpy(values[order].astype(np.float32)),
        n_rows=n_rows,
    )


def read_user_block(path: str, user_start: int, n_rows: int, like_threshold: float | None) -> SideEntries:
    """A user block's entries (all of them, or only the liked ones when ``like_threshold`` is set)."""
    table = pq.read_table(path)
    if like_threshold is not None:
        table = table.filter(pc.greater_equal(table["rating"], like_threshold))
    return _sorted_entries(
        table["user"].to_numpy() - user_start, table["item"].to_numpy(), table["rating"].to_numpy(), n_rows
    )


def split_by_item_block(entries: SideEntries, user_start: int, item_grid: BlockGrid) -> list[SideEntries]:
    """A user block's entries cut by item block, re-indexed item-side (local item, global user)."""
    pieces = []
    for _, start, stop in item_grid:
        inside = (entries.cols >= start) & (entries.cols < stop)
        pieces.append(
            SideEntries(
                rows=entries.cols[inside] - start,
                cols=entries.rows[inside] + user_start,
                values=entries.values[inside],
                n_rows=stop - start,
            )
        )
    return pieces


def pick(sequence: list | tuple, index: int) -> object:
    return sequence[index]


def merge_pieces(n_rows: int, *pieces: SideEntries) -> SideEntries:
    """One item block's entries from every user block (in user block order), sorted by (item, user).

    Each piece is in ascending user order already (its user block's entries
    are sorted by user), so one stable sort by item gives (item, user) order;
    on 16-bit keys numpy's stable sort is a radix sort, linear in the entries
    (a two-key lexsort took a second for the 4.5 M entries of ML-20M's most
    liked item block).
    """
    rows = torch.cat([p.rows for p in pieces])
    key_type = np.int16 if n_rows <= np.iinfo(np.int16).max else np.int32
    order = torch.from_numpy(np.argsort(rows.numpy().astype(key_type), kind="stable"))
    return SideEntries(
        rows=rows[order],
        cols=torch.cat([p.cols for p in pieces])[order],
        values=torch.cat([p.values for p in pieces])[order],
        n_rows=n_rows,
    )


def entry_count(entries: SideEntries) -> int:
    return len(entries.values)


def balanced_row_ranges(entries: SideEntries, pieces: int) -> list[tuple[int, int]]:
    """Cut the block's rows into at most ``pieces`` half-open ranges of about equal entry counts.

    Ranges cover ``[0, n_rows)`` in order, each non-empty; a row is never cut,
    so one row with more entries than a piece's share makes a larger piece.
    """
    total = len(entries.values)
    if pieces <= 1 or total == 0 or entries.n_rows <= 1:
        return [(0, entries.n_rows)]
    # The piece boundaries are the rows of the entries at multiples of total / pieces.
    targets = torch.arange(1, pieces, dtype=torch.int64) * total // pieces
    cuts = sorted({int(row) for row in entries.rows[targets]} - {0})
    bounds = [0, *[cut for cut in cuts if cut < entries.n_rows], entries.n_rows]
    return list(itertools.pairwise(bounds))


def slice_rows(entries: SideEntries, start: int, stop: int) -> SideEntries:
    """The entries of rows ``[start, stop)``, re-indexed so that row ``start`` is 0."""
    first, last = np.searchsorted(entries.rows.numpy(), [start, stop])
    return SideEntries(
        rows=entries.rows[first:last] - start,
        cols=entries.cols[first:last],
        values=entries.values[first:last],
        n_rows=stop - start,
    )


@dataclass
class RatingsSides:
    """Futures of :class:`SideEntries`: one per user block and one per item block."""

    users: list[Future]
    items: list[Future]
    n_entries: int


def load_ratings_sides(
    client: Client,
    ingest: IngestResult,
    *,
    liked_only: bool,
    resources: dict[str, float] | None,
) -> RatingsSides:
    """Build both views of the ingested ratings on the workers (one shuffle, at the start)."""
    threshold = ingest.like_threshold if liked_only else None

    def submit(function: object, *args: object) -> Future:
        return client.submit(function, *args, resources=resources, pure=False)

    users = [
        submit(read_user_block, str(ingest.ratings_path(p)), start, stop - start, threshold)
        for p, start, stop in ingest.user_grid
    ]
    pieces = [
        submit(split_by_item_block, block, start, ingest.item_grid)
        for block, (_, start, _) in zip(users, ingest.user_grid, strict=True)
    ]
    items = [
        submit(merge_pieces, stop - start, *[client.submit(pick, piece, q) for piece in pieces])
        for q, start, stop in ingest.item_grid
    ]
    n_entries = sum(client.gather([client.submit(entry_count, block) for block in users]))
    return RatingsSides(users=users, items=items, n_entries=n_entries)


def concatenate_vectors(*blocks: RowBlock) -> Tensor:
    """The whole side's vectors (rows × k) from its row blocks, in block order."""
    return torch.cat([b.vectors for b in blocks])


def concatenate_bias(*blocks: RowBlock) -> Tensor:
    return torch.cat([b.bias if b.bias is not None else torch.zeros(b.n_rows) for b in blocks])


def random_row_block(n_rows: int, rank: int, scale: float, seed: int, with_bias: bool) -> RowBlock:
    """A fresh row block: N(0, scale²) vectors, zero biases; the seed comes from block coordinates."""
    generator = torch.Generator().manual_seed(seed)
    return RowBlock(
        vectors=torch.randn(n_rows, rank, generator=generator) * scale,
        bias=torch.zeros(n_rows) if with_bias else None,
    )


def block_gram(block: RowBlock) -> Tensor:
    """VᵀV of one row block in float64 (k × k), so that block sums stay exact."""
    v = block.vectors.double()
    return v.T @ v


def sum_tensors(*tensors: Tensor) -> Tensor:
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total += tensor
    return total
