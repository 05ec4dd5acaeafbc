"""The compiled pair-count loops against NumPy's dense product of the same binary matrices."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from mf_dist.counting import pair_counts


def binary_csr(rows: int, cols: int, density: float, seed: int, index_dtype: type) -> sp.csr_matrix:
    """A random binary CSR matrix (int32 values, sorted indices of ``index_dtype``)."""
    dense = (np.random.default_rng(seed).random((rows, cols)) < density).astype(np.int32)
    return with_index_dtype(sp.csr_matrix(dense), index_dtype)


def with_index_dtype(matrix: sp.csr_matrix, index_dtype: type) -> sp.csr_matrix:
    """``matrix`` with both index arrays in ``index_dtype`` (scipy picks int32 when it can)."""
    matrix.indptr = matrix.indptr.astype(index_dtype)
    matrix.indices = matrix.indices.astype(index_dtype)
    return matrix


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("density", [0.02, 0.3, 0.9])
@pytest.mark.parametrize("ranges", [[(0, 23)], [(0, 1), (1, 9), (9, 23)]])
def test_dense_rows_of_an_off_diagonal_tile(index_dtype, density, ranges):
    left_s = binary_csr(50, 23, density, seed=1, index_dtype=index_dtype)
    right = binary_csr(50, 31, density, seed=2, index_dtype=index_dtype)
    left = with_index_dtype(left_s.T.tocsr(), index_dtype)
    expected = left_s.toarray().T @ right.toarray()
    pieces = [pair_counts.dense_rows(left, right, start, stop, upper=False) for start, stop in ranges]
    assert all(piece.dtype == np.int32 for piece in pieces)
    np.testing.assert_array_equal(np.concatenate(pieces), expected)
    work = pair_counts.row_work(left, right, upper=False)
    np.testing.assert_array_equal(work, left_s.toarray().T @ right.toarray().sum(axis=1))


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("density", [0.02, 0.3, 0.9])
@pytest.mark.parametrize("ranges", [[(0, 29)], [(0, 4), (4, 5), (5, 29)]])
def test_upper_triangle_of_a_diagonal_tile_mirrored(index_dtype, density, ranges):
    """On the diagonal only j ≥ i is counted, in any row pieces; mirroring gives SᵀS."""
    s = binary_csr(60, 29, density, seed=3, index_dtype=index_dtype)
    left = with_index_dtype(s.T.tocsr(), index_dtype)
    assert left.indices.dtype == s.indices.dtype == index_dtype
    full = s.toarray().T @ s.toarray()
    upper = np.concatenate([pair_counts.dense_rows(left, s, a, b, upper=True) for a, b in ranges])
    np.testing.assert_array_equal(upper, np.triu(full))
    work = pair_counts.row_work(left, s, upper=True)
    np.testing.assert_array_equal(work, np.triu(full).sum(axis=1))
    mirrored = pair_counts.mirror_upper(upper)
    np.testing.assert_array_equal(mirrored, full)


@pytest.mark.parametrize("n", [1, 63, 64, 65, 130])
def test_mirror_upper_across_its_squares(n):
    """The 64 × 64 squares of the copy meet at every size: below, at and past one square."""
    tile = np.triu(np.arange(n * n, dtype=np.int32).reshape(n, n))
    expected = tile + np.triu(tile, 1).T
    np.testing.assert_array_equal(pair_counts.mirror_upper(tile), expected)


def test_empty_rows_and_users():
    """Items nobody liked and users with no like in the block give zero rows and no work."""
    s = sp.csr_matrix(np.array([[0, 0, 0], [1, 0, 1], [0, 0, 0]], dtype=np.int32))
    left = s.T.tocsr()
    np.testing.assert_array_equal(
        pair_counts.dense_rows(left, s, 0, 3, upper=True), [[1, 0, 1], [0, 0, 0], [0, 0, 1]]
    )
    np.testing.assert_array_equal(pair_counts.row_work(left, s, upper=False), [2, 0, 2])


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("shape", [(7, 7), (5, 9), (9, 5)])
def test_off_diagonal_entries_and_summary(diagonal, shape):
    rng = np.random.default_rng(4)
    tile = (rng.integers(0, 4, size=shape) * rng.integers(0, 50_000, size=shape)).astype(np.int32)
    kept = tile.copy()
    if diagonal:
        np.fill_diagonal(kept, 0)
    nonzeros, squares = pair_counts.off_diagonal_summary(tile, diagonal=diagonal)
    rows, cols, counts = pair_counts.off_diagonal_entries(tile, diagonal=diagonal, nonzeros=nonzeros)
    expected_rows, expected_cols = np.nonzero(kept)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_array_equal(cols, expected_cols)
    np.testing.assert_array_equal(counts, kept[expected_rows, expected_cols])
    assert {rows.dtype, cols.dtype, counts.dtype} == {np.dtype(np.int32)}
    assert nonzeros == np.count_nonzero(kept)
    assert squares == sum(int(v) ** 2 for v in kept.ravel())


def test_assembled_diagonal_tile_leaves_its_pieces_as_they_were():
    """Pieces are Dask task inputs: assembling (and mirroring) works on new memory."""
    from mf_dist.stages.cooccur import assembled_tile

    s = binary_csr(40, 12, 0.4, seed=5, index_dtype=np.int32)
    left = s.T.tocsr()
    pieces = [pair_counts.dense_rows(left, s, a, b, upper=True) for a, b in [(0, 5), (5, 12)]]
    before = [piece.copy() for piece in pieces]
    np.testing.assert_array_equal(assembled_tile(*pieces, diagonal=True), s.toarray().T @ s.toarray())
    for piece, original in zip(pieces, before, strict=True):
        np.testing.assert_array_equal(piece, original)


def test_summary_of_counts_past_int64_squares_is_still_exact():
    """Counts whose squares sum past 2⁶³ fall back to exact Python integers."""
    tile = np.full((3, 3), 2_000_000_000, dtype=np.int32)
    tile[1, 1] = 5
    nonzeros, squares = pair_counts.off_diagonal_summary(tile, diagonal=True)
    assert nonzeros == 6
    assert squares == 6 * 2_000_000_000**2
