"""Co-occurrence stage: X = SᵀS from tiles equals scipy's product exactly."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from mf_dist.blocks import row_pieces
from mf_dist.errors import InputError
from mf_dist.stages import cooccur
from mf_dist.stages.cooccur import cooccurrence_blocks
from mf_dist.stages.ingest import ingest_ratings
from mf_dist.storage.ingested import liked_mask
from mf_dist.storage.tiles import load_tile
from tests.support.data import write_input


def assembled_x(result) -> np.ndarray:
    """The dense X (diagonal included) rebuilt from the stored tiles: for tests only."""
    grid = result.item_grid
    x = np.zeros((grid.n_rows, grid.n_rows), dtype=np.int64)
    for info in result.tiles:
        rows, cols = grid.bounds(info.row_block), grid.bounds(info.col_block)
        tile = load_tile(info, (rows[1] - rows[0], cols[1] - cols[0]))
        tile = tile if isinstance(tile, np.ndarray) else tile.toarray()
        x[rows[0] : rows[1], cols[0] : cols[1]] = tile
        x[cols[0] : cols[1], rows[0] : rows[1]] = tile.T
    diagonal = pq.read_table(result.diagonal_path)["count"].to_numpy()
    x[np.arange(grid.n_rows), np.arange(grid.n_rows)] = diagonal
    return x


def scipy_reference(ingest) -> np.ndarray:
    """SᵀS by scipy on the ingested (indexed, de-duplicated) ratings."""
    table = pd.concat(
        [pq.read_table(ingest.ratings_path(b)).to_pandas() for b in range(ingest.user_grid.n_blocks)]
    )
    liked = table[liked_mask(table["rating"].to_numpy(), ingest.like_threshold)]
    s = sp.csr_matrix(
        (np.ones(len(liked), dtype=np.int64), (liked["user"], liked["item"])),
        shape=(ingest.n_users, ingest.n_items),
    )
    return (s.T @ s).toarray()


@pytest.mark.parametrize("block_size", [16, 37, 4096])
@pytest.mark.parametrize("like_threshold", [None, 4.0])
def test_tiles_equal_scipy_product(client, tmp_path, tiny_input, block_size, like_threshold):
    ingest = ingest_ratings(
        client, str(tiny_input), tmp_path / "work", block_size=block_size, like_threshold=like_threshold
    )
    result = cooccurrence_blocks(client, ingest, tmp_path / "work")
    expected = scipy_reference(ingest)
    np.testing.assert_array_equal(assembled_x(result), expected)
    off = expected - np.diag(np.diag(expected))
    assert result.nnz_offdiagonal == np.count_nonzero(off)
    assert result.offdiagonal_sum_of_squares == float((off.astype(np.float64) ** 2).sum())
    n_blocks = result.item_grid.n_blocks
    assert len(result.tiles) == n_blocks * (n_blocks + 1) // 2
    assert all(t.row_block <= t.col_block for t in result.tiles)


def test_popular_tiles_are_dense_and_tail_tiles_sparse(client, tmp_path, tiny_input):
    """Items ordered by popularity make the head tile dense and the tail sparse."""
    ingest = ingest_ratings(client, str(tiny_input), tmp_path / "work", block_size=16)
    result = cooccurrence_blocks(client, ingest, tmp_path / "work")
    layouts = {(t.row_block, t.col_block): t.layout for t in result.tiles}
    last = result.item_grid.n_blocks - 1
    assert layouts[0, 0] == "dense"
    assert layouts[last, last] == "sparse"


def test_no_likes_is_a_clear_error(client, tmp_path, tiny_input):
    """Caught at ingest, before any co-occurrence work is scheduled."""
    with pytest.raises(InputError, match=r"no rating reaches the like threshold 99\.0"):
        ingest_ratings(client, str(tiny_input), tmp_path / "work", like_threshold=99.0)


def test_movielens_100k_equals_scipy(client, tmp_path, movielens_100k):
    """MovieLens 100K (when ../shared/data has it): every like and every rating."""
    source = write_input(movielens_100k, tmp_path / "ml", 4)
    for threshold in (None, 4.0):
        ingest = ingest_ratings(
            client, str(source), tmp_path / "work", block_size=512, like_threshold=threshold
        )
        result = cooccurrence_blocks(client, ingest, tmp_path / "work")
        assert ingest.n_ratings == 100_000
        np.testing.assert_array_equal(assembled_x(result), scipy_reference(ingest))
        assert {t.layout for t in result.tiles} == {"dense", "sparse"}


@pytest.mark.parametrize("pieces", [1, 2, 3, 7])
def test_row_pieces_cover_the_rows_in_order_with_balanced_work(pieces):
    work = np.array([50, 1, 1, 1, 20, 0, 0, 3, 30, 1, 1, 1], dtype=np.int64)
    ranges = row_pieces(work, pieces)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(work)
    assert all(a < b for a, b in ranges) and all(b == c for (_, b), (c, _) in itertools.pairwise(ranges))
    assert len(ranges) <= pieces
    # No cut can do better than the heaviest row; otherwise each piece stays near its share.
    heaviest = max(int(work[a:b].sum()) for a, b in ranges)
    assert heaviest <= max(int(work.max()), 2 * work.sum() / pieces)


def test_crowded_tiles_in_row_pieces_store_the_same_tiles(client, tmp_path, tiny_input, monkeypatch):
    """Cutting the costly tiles into row-piece tasks changes nothing that is stored."""
    ingest = ingest_ratings(client, str(tiny_input), tmp_path / "work", block_size=37)
    grid = ingest.item_grid
    plans, stored = {}, {}
    planner = cooccur.tile_plans
    for share in (1.0, 0.01):
        monkeypatch.setattr(cooccur, "PIECE_SHARE", share)
        monkeypatch.setattr(
            cooccur, "tile_plans", lambda *args, share=share: plans.setdefault(share, planner(*args))
        )
        result = cooccurrence_blocks(client, ingest, tmp_path / "work")
        stored[share] = {}
        for info in result.tiles:
            shape = (grid.size(info.row_block), grid.size(info.col_block))
            tile = load_tile(info, shape)
            dense = tile if isinstance(tile, np.ndarray) else tile.toarray()
            stored[share][info.row_block, info.col_block] = (info.layout, info.nnz, dense.tolist())
    assert max(len(plan.row_ranges) for plan in plans[1.0].values()) == 1
    assert max(len(plan.row_ranges) for plan in plans[0.01].values()) > 1
    # Both products, and the dense one in pieces on the diagonal (upper triangles, mirrored once).
    assert {plan.dense for plan in plans[0.01].values()} == {True, False}
    assert any(plan.dense and len(plan.row_ranges) > 1 for (b, c), plan in plans[0.01].items() if b == c)
    assert stored[1.0] == stored[0.01]
