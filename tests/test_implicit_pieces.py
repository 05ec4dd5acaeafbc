"""Implicit ALS solved in row pieces (load balancing of crowded blocks) equals the whole-block solve."""

from __future__ import annotations

import itertools

import torch

from mf_dist.models import implicit
from mf_dist.trainers.ratings_sides import SideEntries, balanced_row_ranges, slice_rows


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
