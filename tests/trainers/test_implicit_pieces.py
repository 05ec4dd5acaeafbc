"""Both sides of the ratings cut into row pieces (load balancing of crowded blocks), and ALS on them.

The pieces are planned from the counts ingest wrote, built on a real two-process
cluster, and solving them one by one equals the whole-block solve.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mf_dist.blocks import BlockGrid, RowBlock, row_pieces
from mf_dist.errors import ConfigError
from mf_dist.models import implicit
from mf_dist.stages.ingest import ingest_ratings
from mf_dist.storage.ingested import liked_mask
from mf_dist.trainers.implicit import other_side
from mf_dist.trainers.piece_placement import least_loaded_placement
from mf_dist.trainers.ratings_sides import (
    SPLIT_FACTOR,
    SideEntries,
    load_ratings_sides,
    merge_pieces,
    plan_pieces,
    read_user_block,
    row_entry_counts,
    slice_rows,
    split_by_item_ranges,
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


@pytest.mark.parametrize("split", [True, False])
def test_plans_cut_only_crowded_blocks_into_balanced_row_ranges(split):
    generator = np.random.default_rng(1)
    counts = generator.integers(0, 5, size=70)
    counts[:10] = generator.integers(40, 90, size=10)  # block 0 is crowded
    grid = BlockGrid(n_rows=70, block_size=16)
    plan = plan_pieces(counts, grid, split=split)
    assert len(plan) == grid.n_blocks
    mean = counts.sum() / grid.n_blocks
    for (_, start, stop), ranges in zip(grid, plan, strict=True):
        assert ranges[0][0] == 0 and ranges[-1][1] == stop - start
        assert all(a < b for a, b in ranges)
        assert all(x[1] == y[0] for x, y in itertools.pairwise(ranges))
        block_counts = counts[start:stop]
        if not split or block_counts.sum() <= SPLIT_FACTOR * mean:
            assert ranges == [(0, stop - start)]
        else:
            # A piece holds about the mean, at most one row more.
            assert len(ranges) == int(np.ceil(block_counts.sum() / mean))
            assert all(block_counts[a:b].sum() <= mean + block_counts.max() for a, b in ranges)
    assert (len(plan[0]) > 1) == split


def test_cg_on_row_pieces_equals_the_whole_block():
    entries = skewed_entries(30, 25, seed=2)
    generator = torch.Generator().manual_seed(3)
    y = torch.randn(25, 6, generator=generator, dtype=torch.float64)
    x = torch.randn(30, 6, generator=generator, dtype=torch.float64)
    whole, _ = implicit.cg_update_rows(entries.rows, entries.cols, entries.values, x, y, y.T @ y, 5.0, 0.2, 3)
    pieces = []
    counts = torch.bincount(entries.rows, minlength=entries.n_rows).numpy()
    ranges = row_pieces(counts, 3)
    assert len(ranges) == 3
    for start, stop in ranges:
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


def test_item_pieces_are_sorted_by_item_then_user():
    """Cut by item ranges (boundaries inside blocks too) and merged, each piece is its items' entries."""
    entries = skewed_entries(30, 40, seed=5)
    bounds = np.array([0, 3, 16, 17, 29, 40])
    user_blocks = ((0, 12), (12, 30))
    cuts = [split_by_item_ranges(slice_rows(entries, a, b), a, bounds) for a, b in user_blocks]
    for q, (start, stop) in enumerate(itertools.pairwise(bounds)):
        merged = merge_pieces(stop - start, *[cut[q] for cut in cuts])
        assert merged.n_rows == stop - start
        inside = (entries.cols >= start) & (entries.cols < stop)
        keys = (entries.cols[inside] - start) * 1000 + entries.rows[inside]
        order = torch.argsort(keys)
        torch.testing.assert_close(merged.rows, (entries.cols[inside] - start)[order], rtol=0, atol=0)
        torch.testing.assert_close(merged.cols, entries.rows[inside][order], rtol=0, atol=0)
        torch.testing.assert_close(merged.values, entries.values[inside][order], rtol=0, atol=0)


def test_a_plan_needs_a_count_for_every_row():
    with pytest.raises(ValueError, match="69 row counts for a grid of 70 rows"):
        plan_pieces(np.ones(69, dtype=np.int64), BlockGrid(n_rows=70, block_size=16), split=True)


def test_likes_are_read_by_the_rule_ingest_counted_them_by(tmp_path):
    """A float32 rating equal to a threshold that float32 cannot hold exactly is a like, as in ingest."""
    path = tmp_path / "block.parquet"
    ratings = pa.array([3.3, 3.2, 4.0], pa.float32())
    pq.write_table(pa.table({"user": [0, 0, 1], "item": [1, 2, 1], "rating": ratings}), path)
    entries = read_user_block(str(path), 0, 2, like_threshold=3.3)
    assert entries.values.tolist() == pytest.approx([3.3, 4.0])
    assert int(liked_mask(ratings.to_numpy(), 3.3).sum()) == len(entries.values)


def test_work_directories_without_like_counts_get_an_actionable_error(client, tmp_path, tiny_input):
    ingest = ingest_ratings(client, str(tiny_input), tmp_path / "work", block_size=32, like_threshold=3.5)
    pq.write_table(pq.read_table(ingest.users_path).drop_columns(["n_likes"]), ingest.users_path)
    with pytest.raises(
        ConfigError, match=r"users\.parquet has no 'n_likes' column.*run the ingest stage again"
    ):
        row_entry_counts(ingest, liked_only=True)
    assert len(row_entry_counts(ingest, liked_only=False)[0]) == ingest.n_users


def test_unsorted_blocks_are_sorted_when_read(tmp_path):
    path = tmp_path / "block.parquet"
    frame = {"user": [5, 4, 5, 4], "item": [2, 7, 1, 3], "rating": [1.0, 2.0, 3.0, 4.5]}
    pq.write_table(pa.table(frame), path)
    entries = read_user_block(str(path), 4, 2, like_threshold=None)
    assert entries.rows.tolist() == [0, 0, 1, 1]
    assert entries.cols.tolist() == [3, 7, 1, 2]
    assert entries.values.tolist() == [4.5, 2.0, 3.0, 1.0]


@pytest.mark.parametrize("split", [True, False])
def test_loaded_sides_hold_every_entry_in_its_planned_piece(clients, tmp_path, tiny_input, split):
    """On two worker processes: each piece holds its rows' likes, and both workers hold pieces."""
    client = clients[2]
    ingest = ingest_ratings(client, str(tiny_input), tmp_path / "work", block_size=32, like_threshold=3.5)
    sides = load_ratings_sides(client, ingest, liked_only=True, resources=None, split=split)
    assert sides.n_entries == ingest.n_likes
    blocks = [pq.read_table(ingest.ratings_path(b)).to_pandas() for b in range(ingest.user_grid.n_blocks)]
    likes = pd.concat(blocks)
    likes = likes[likes.rating >= 3.5]
    user_counts, item_counts = row_entry_counts(ingest, liked_only=True)
    assert user_counts.tolist() == np.bincount(likes.user, minlength=ingest.n_users).tolist()
    assert item_counts.tolist() == np.bincount(likes.item, minlength=ingest.n_items).tolist()
    if split:
        assert any(len(ranges) > 1 for ranges in sides.item_ranges)
    else:
        assert all(len(ranges) == 1 for ranges in sides.user_ranges + sides.item_ranges)
    for side, grid, row, col in (
        ("user", ingest.user_grid, "user", "item"),
        ("item", ingest.item_grid, "item", "user"),
    ):
        futures, plan = getattr(sides, f"{side}s"), getattr(sides, f"{side}_ranges")
        for (_, start, _), pieces, ranges in zip(grid, futures, plan, strict=True):
            for piece, (a, b) in zip(client.gather(pieces), ranges, strict=True):
                first = start + a
                expected = likes[(likes[row] >= first) & (likes[row] < start + b)]
                expected = expected.sort_values([row, col])
                assert piece.n_rows == b - a
                assert piece.rows.tolist() == (expected[row] - first).tolist()
                assert piece.cols.tolist() == expected[col].tolist()
                assert piece.values.tolist() == expected.rating.tolist()
    holders = client.who_has([f for pieces in sides.items for f in pieces])
    assert len({worker for workers in holders.values() for worker in workers}) == 2


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
