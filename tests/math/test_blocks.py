"""Tests of the block grid, the stored upper triangle and the DSGD schedule."""

import itertools

import pytest

from mf_dist.blocks import BlockGrid, dsgd_strata, upper_triangle


@pytest.mark.parametrize(
    ("n_rows", "block_size", "expected"),
    [(0, 3, 0), (1, 1, 1), (9, 3, 3), (10, 3, 4), (2, 5, 1), (5, 5, 1), (6, 5, 2)],
)
def test_n_blocks_is_ceiling_division(n_rows, block_size, expected):
    """n_blocks is ceil(n_rows / block_size), zero for an empty grid."""
    assert BlockGrid(n_rows, block_size).n_blocks == expected


@pytest.mark.parametrize(
    ("n_rows", "block_size", "expected"),
    [
        (9, 3, [(0, 3), (3, 6), (6, 9)]),
        (10, 3, [(0, 3), (3, 6), (6, 9), (9, 10)]),
        (2, 5, [(0, 2)]),
        (7, 1, [(i, i + 1) for i in range(7)]),
    ],
)
def test_bounds_and_sizes(n_rows, block_size, expected):
    """bounds gives contiguous half-open ranges; only the last block may be shorter."""
    grid = BlockGrid(n_rows, block_size)
    assert [grid.bounds(b) for b in range(grid.n_blocks)] == expected
    sizes = [grid.size(b) for b in range(grid.n_blocks)]
    assert sizes == [stop - start for start, stop in expected]
    assert all(size == block_size for size in sizes[:-1])
    assert 1 <= sizes[-1] <= block_size


@pytest.mark.parametrize(("n_rows", "block_size"), [(0, 4), (1, 4), (12, 4), (13, 4), (13, 5), (100, 7)])
def test_iteration_covers_every_index_once(n_rows, block_size):
    """Iterating yields (block, start, stop) in order, tiling 0..n_rows exactly once."""
    grid = BlockGrid(n_rows, block_size)
    visited = list(grid)
    assert [block for block, _, _ in visited] == list(range(grid.n_blocks))
    assert [(start, stop) for _, start, stop in visited] == [grid.bounds(b) for b in range(grid.n_blocks)]
    covered = [i for _, start, stop in visited for i in range(start, stop)]
    assert covered == list(range(n_rows))


@pytest.mark.parametrize(("n_rows", "block_size"), [(10, 0), (10, -1), (-1, 3)])
def test_invalid_grid_raises(n_rows, block_size):
    """A non-positive block size or a negative row count is rejected."""
    with pytest.raises(ValueError):
        BlockGrid(n_rows, block_size)


@pytest.mark.parametrize("block", [-1, 4, 5])
def test_bounds_outside_grid_raise(block):
    """bounds and size refuse block numbers outside 0..n_blocks-1 (negatives included)."""
    grid = BlockGrid(10, 3)
    with pytest.raises(IndexError):
        grid.bounds(block)
    with pytest.raises(IndexError):
        grid.size(block)


def test_empty_grid_has_no_blocks():
    """A grid of zero rows iterates to nothing and has no valid block 0."""
    grid = BlockGrid(0, 3)
    assert list(grid) == []
    with pytest.raises(IndexError):
        grid.bounds(0)


@pytest.mark.parametrize("n_blocks", [0, 1, 2, 3, 6])
def test_upper_triangle_is_each_unordered_pair_once(n_blocks):
    """upper_triangle lists every (b, c) with b <= c once, in row-major order."""
    tiles = upper_triangle(n_blocks)
    expected = list(itertools.combinations_with_replacement(range(n_blocks), 2))
    assert tiles == expected
    assert len(tiles) == n_blocks * (n_blocks + 1) // 2
    assert all(b <= c for b, c in tiles)


@pytest.mark.parametrize(
    ("n_row_blocks", "n_col_blocks"),
    [(1, 1), (1, 5), (5, 1), (2, 2), (3, 3), (4, 7), (7, 4), (2, 3), (6, 6)],
)
def test_dsgd_strata_partition_the_grid(n_row_blocks, n_col_blocks):
    """Every block appears in exactly one stratum; no stratum reuses a row or column block."""
    strata = dsgd_strata(n_row_blocks, n_col_blocks)
    assert len(strata) == max(n_row_blocks, n_col_blocks)
    assert all(strata)
    flat = [block for stratum in strata for block in stratum]
    assert sorted(flat) == list(itertools.product(range(n_row_blocks), range(n_col_blocks)))
    for stratum in strata:
        rows = [p for p, _ in stratum]
        cols = [q for _, q in stratum]
        assert len(set(rows)) == len(rows)
        assert len(set(cols)) == len(cols)
