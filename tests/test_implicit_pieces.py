"""Implicit ALS solved in row pieces (load balancing of crowded blocks) equals the whole-block solve."""

from __future__ import annotations

import itertools

import pytest
import torch

from mf_dist.blocks import BlockGrid
from mf_dist.models import implicit
from mf_dist.solvers.gradient import RowBlock
from mf_dist.trainers.implicit import other_side
from mf_dist.trainers.piece_placement import least_loaded_placement
from mf_dist.trainers.ratings_sides import (
    SideEntries,
    balanced_row_ranges,
    merge_pieces,
    slice_rows,
    split_by_item_block,
)


def skewed_entries(n_rows: int, n_cols: int, seed: int) -> SideEntries:
    """Entries sorted by (row, col) whose first rows hold most of them, like popular items."""
    generator = torch.Generator().manual_seed(seed)
    density = torch.linspace(0.9, 0.05, n_rows)[:, None].expand(n_rows, n_cols)
    mask = torch.rand(n_rows, n_cols, generator=generator) < density
    mask[3] = False
    rows, cols = mask.nonzero(as_tuple=True)
    values = torch.randint(1, 6, (len(rows),), generator=generator).float()
    return SideEntries(rows=rows, cols=cols, values=values, n_rows=n_rows)


def test_balanced_row_ranges_cover_the_rows_with_even_counts():
    entries = skewed_entries(40, 50, seed=1)
    ranges = balanced_row_ranges(entries, 4)
    assert ranges[0][0] == 0 and ranges[-1][1] == entries.n_rows
    assert all(start < stop for start, stop in ranges)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    counts = [len(slice_rows(entries, start, stop).values) for start, stop in ranges]
    assert sum(counts) == len(entries.values)
    assert max(counts) < 0.5 * len(entries.values)
    assert balanced_row_ranges(entries, 1) == [(0, entries.n_rows)]


def test_cg_on_row_pieces_equals_the_whole_block():
    entries = skewed_entries(30, 25, seed=2)
    generator = torch.Generator().manual_seed(3)
    y = torch.randn(25, 6, generator=generator, dtype=torch.float64)
    x = torch.randn(30, 6, generator=generator, dtype=torch.float64)
    whole, _ = implicit.cg_update_rows(entries.rows, entries.cols, entries.values, x, y, y.T @ y, 5.0, 0.2, 3)
    pieces = []
    for start, stop in balanced_row_ranges(entries, 3):
        piece = slice_rows(entries, start, stop)
        pieces.append(
            implicit.cg_update_rows(
                piece.rows, piece.cols, piece.values, x[start:stop], y, y.T @ y, 5.0, 0.2, 3
            )[0]
        )
    torch.testing.assert_close(torch.cat(pieces), whole, rtol=1e-12, atol=1e-12)


def test_pieces_go_to_the_least_loaded_worker_largest_first():
    loads = {"a": 100, "b": 0, "c": 40}
    sizes = [30, 70, 50, 10]
    placement = least_loaded_placement(loads, sizes)
    # 70 → b (0), 50 → c (40), 30 → b (70), 10 → c (90).
    assert placement == ["b", "b", "c", "c"]
    totals = dict(loads)
    for worker, size in zip(placement, sizes, strict=True):
        totals[worker] += size
    assert max(totals.values()) - min(totals.values()) <= max(sizes)
    with pytest.raises(ValueError, match="no workers"):
        least_loaded_placement({}, [1])


def test_merged_item_blocks_are_sorted_by_item_then_user():
    """merge_pieces's single stable sort gives the (item, user) order the two-key sort gave."""
    entries = skewed_entries(30, 40, seed=5)
    grid = BlockGrid(n_rows=40, block_size=16)
    pieces = [split_by_item_block(slice_rows(entries, a, b), a, grid) for a, b in ((0, 12), (12, 30))]
    for q, start, stop in grid:
        merged = merge_pieces(stop - start, *[piece[q] for piece in pieces])
        inside = (entries.cols >= start) & (entries.cols < stop)
        keys = (entries.cols[inside] - start) * 1000 + entries.rows[inside]
        order = torch.argsort(keys)
        torch.testing.assert_close(merged.rows, (entries.cols[inside] - start)[order], rtol=0, atol=0)
        torch.testing.assert_close(merged.cols, entries.rows[inside][order], rtol=0, atol=0)
        torch.testing.assert_close(merged.values, entries.values[inside][order], rtol=0, atol=0)


def test_the_other_side_is_reused_only_for_the_same_blocks():
    blocks = tuple(RowBlock(vectors=torch.randn(n, 3)) for n in (4, 2, 5))
    vectors, gram = other_side(torch.device("cpu"), *blocks)
    torch.testing.assert_close(vectors, torch.cat([b.vectors for b in blocks]))
    torch.testing.assert_close(gram, (vectors.double().T @ vectors.double()))
    again, _ = other_side(torch.device("cpu"), *blocks)
    assert again is vectors
    # Equal contents in new objects (the next epoch's blocks) are computed afresh.
    copies = tuple(RowBlock(vectors=b.vectors.clone() + 1) for b in blocks)
    fresh, fresh_gram = other_side(torch.device("cpu"), *copies)
    assert fresh is not vectors
    torch.testing.assert_close(fresh, vectors + 1)
    torch.testing.assert_close(fresh_gram, (fresh.double().T @ fresh.double()))
