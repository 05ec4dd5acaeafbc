"""Co-occurrence stage: X = SᵀS in item-block tiles, never as one items × items matrix.

S is the binary users × items "liked" matrix. Each user block's ratings
file is read once and cut into item blocks; the pieces of item block b are
stacked into the column slab S_{:,b} (all users, scipy CSR), kept with its
transpose on the workers (S in total, twice: O(likes) memory). Tile (b, c),
b <= c, is ``S_{:,b}ᵀ S_{:,c}``, computed by one task whose memory is
bounded by two column slabs and one B × B tile. X is symmetric, so only
b <= c is stored; the diagonal (per-item like counts) is stored apart and is
zero inside the tiles. Tiles that may be dense (popular items) are counted
by the compiled loops of :mod:`mf_dist.counting.pair_counts`, the others by scipy's
sparse product.

Each tile is written in the layout its density calls for: a dense ``.npy``
tile (int32) when more than :data:`DENSE_TILE_DENSITY` of it is non-zero,
else sparse COO in Parquet (``row``, ``col``, ``count``; indices local to the
tile).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
from distributed import Client, Future
from pydantic import BaseModel

from mf_dist.blocks import BlockGrid, row_pieces, upper_triangle
from mf_dist.counting import pair_counts
from mf_dist.errors import InputError
from mf_dist.storage.ingested import IngestResult, liked_mask
from mf_dist.storage.schema import COOCCURRENCE_DIR, TILE_SCHEMA
from mf_dist.storage.store import (
    delete_prefix,
    exists,
    is_remote,
    join,
    make_dirs,
    read_table,
    save_array,
    write_bytes,
    write_table,
)
from mf_dist.storage.tiles import CooccurrenceResult, TileInfo

logger = logging.getLogger(__name__)

# COO in Parquet costs about 12 bytes per non-zero before compression, a
# dense int32 tile 4 bytes per entry; past a third non-zero the tile is smaller
# dense, and dense tiles feed GEMMs instead of sparse products.
DENSE_TILE_DENSITY = 1 / 3

# A tile with more than this share of the stage's multiply-adds is computed
# in row pieces of about this share each: enough tasks for two to eight
# workers to share the crowded tiles of popular items.
PIECE_SHARE = 1 / 16

# Entries squared at once when summing a tile's squares (8 MiB of int64).
SQUARES_SLICE = 1 << 20


def liked_slabs(
    ratings_path: str,
    user_start: int,
    n_users: int,
    item_grid: BlockGrid,
    like_threshold: float | None,
) -> list[sp.csr_matrix]:
    """S for one user block, cut into one CSR slab per item block (users × block items, int32)."""
    table = read_table(ratings_path)
    rating = table["rating"].to_numpy()
    liked = liked_mask(rating, like_threshold)
    users = table["user"].to_numpy()[liked] - user_start
    items = table["item"].to_numpy()[liked]
    slabs = []
    for _, start, stop in item_grid:
        # The block file is sorted by (user, item), so each slab's rows come out sorted.
        inside = (items >= start) & (items < stop)
        slabs.append(
            sp.csr_matrix(
                (np.ones(int(inside.sum()), dtype=np.int32), (users[inside], items[inside] - start)),
                shape=(n_users, stop - start),
            )
        )
    return slabs


def item_block_slab(*user_block_slabs: list[sp.csr_matrix], block: int) -> sp.csr_matrix:
    """S_{:,b}: item block ``block`` of every user block stacked (all users × block items, CSR).

    Column indices are sorted in each row, as :mod:`mf_dist.counting.pair_counts` needs.
    """
    slab = sp.vstack([slabs[block] for slabs in user_block_slabs], format="csr")
    slab.sort_indices()
    return slab


def transposed_slab(slab: sp.csr_matrix) -> sp.csr_matrix:
    """S_{:,b}ᵀ as CSR (block items × users): the left operand of every tile in row block b."""
    return slab.T.tocsr()


class TilePlan(BaseModel):
    """How tile (b, c) is computed: by which product, in which row ranges."""

    dense: bool
    row_ranges: list[tuple[int, int]]


def tile_work(
    left_transposed: sp.csr_matrix, right: sp.csr_matrix, diagonal: bool
) -> tuple[bool, np.ndarray]:
    """(dense, work of each row) for tile (b, c): which product computes it, and its cost per row.

    A tile with at least :data:`DENSE_TILE_DENSITY` × its area in multiply-adds
    may be dense and is counted into a dense array
    (:func:`mf_dist.counting.pair_counts.dense_rows`, the upper triangle only on the
    diagonal); a sparser one is surely stored sparse and stays with scipy's
    sparse product.
    """
    work = pair_counts.row_work(left_transposed, right, upper=False)
    dense = float(work.sum()) >= DENSE_TILE_DENSITY * left_transposed.shape[0] * right.shape[1]
    if dense and diagonal:
        work = pair_counts.row_work(left_transposed, right, upper=True)
    return dense, work


def tile_rows(
    left_transposed: sp.csr_matrix,
    right: sp.csr_matrix,
    start: int,
    stop: int,
    *,
    dense: bool,
    diagonal: bool,
) -> np.ndarray | sp.csr_matrix:
    """Rows ``[start, stop)`` of tile (b, c) = ``S_{:,b}ᵀ S_{:,c}``, exact in int32.

    Dense: an int32 array, holding only j ≥ i on the diagonal (see
    :func:`assembled_tile`). Sparse: scipy's CSR product. Per-tile products
    are faster than one big one, the accumulator of each output row staying
    in cache, and the operands are built once per item block and shared by
    every tile of its row or column.
    """
    if dense:
        return pair_counts.dense_rows(left_transposed, right, start, stop, upper=diagonal)
    return left_transposed[start:stop] @ right


def assembled_tile(*pieces: np.ndarray | sp.csr_matrix, diagonal: bool) -> np.ndarray | sp.csr_matrix:
    """A whole tile from its row pieces in order, in new memory (the pieces are task inputs).

    A dense diagonal tile's pieces hold its upper triangle; the lower one is mirrored.
    """
    if isinstance(pieces[0], np.ndarray):
        tile = np.concatenate(pieces)
        return pair_counts.mirror_upper(tile) if diagonal else tile
    return sp.vstack(pieces, format="csr")


def cooccurrence_tile(
    left_transposed: sp.csr_matrix, right: sp.csr_matrix, *, dense: bool, diagonal: bool
) -> np.ndarray | sp.csr_matrix:
    """Tile (b, c) of X in one task: :func:`tile_rows` over all rows, mirrored on the diagonal."""
    tile = tile_rows(left_transposed, right, 0, left_transposed.shape[0], dense=dense, diagonal=diagonal)
    return pair_counts.mirror_upper(tile) if dense and diagonal else tile


def exact_sum_of_squares(counts: np.ndarray) -> int:
    """Σ c² of integer counts, exactly, in slices: no float64 copy of a tile's 10⁷-odd entries."""
    total = 0
    for start in range(0, len(counts), SQUARES_SLICE):
        piece = counts[start : start + SQUARES_SLICE].astype(np.int64)
        total += int(piece @ piece)
    return total


def store_tile(
    tile: np.ndarray | sp.csr_matrix, row_block: int, col_block: int, directory: str
) -> tuple[TileInfo, np.ndarray | None]:
    """Write one tile in its layout; for a diagonal tile, return its diagonal apart.

    ``tile`` is the whole tile from :func:`assembled_tile`, dense (int32) or
    scipy's CSR product, which has no duplicate entries and is written as it
    comes, with no COO round trip or ``sum_duplicates`` (they cost more than
    the product did). ``tile`` itself is left as it was, so a retried task
    reads the same input.
    """
    on_diagonal = row_block == col_block
    diagonal = tile.diagonal().astype(np.int64) if on_diagonal else None
    if isinstance(tile, np.ndarray):
        nnz, squares = pair_counts.off_diagonal_summary(tile, diagonal=on_diagonal)
    else:
        on_diagonal_counts = np.zeros(0, dtype=np.int64) if diagonal is None else diagonal
        nnz = int(np.count_nonzero(tile.data)) - int(np.count_nonzero(on_diagonal_counts))
        squares = exact_sum_of_squares(tile.data) - int(on_diagonal_counts @ on_diagonal_counts)
    density = nnz / max(1, tile.shape[0] * tile.shape[1])
    name = f"tile-{row_block:05d}-{col_block:05d}"
    if density > DENSE_TILE_DENSITY:
        layout = "dense"
        path = join(directory, f"{name}.npy")
        if is_remote(path):
            # An object is put whole: the tile is built in memory, then sent.
            dense = np.array(tile.toarray() if sp.issparse(tile) else tile, dtype=np.int32)
            if on_diagonal:
                np.fill_diagonal(dense, 0)
            save_array(path, dense)
        else:
            stored = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=tile.shape)
            stored[:] = tile.toarray() if sp.issparse(tile) else tile
            if on_diagonal:
                np.fill_diagonal(stored, 0)
            stored.flush()
            del stored
    else:
        layout = "sparse"
        path = join(directory, f"{name}.parquet")
        if isinstance(tile, np.ndarray):
            rows, cols, counts = pair_counts.off_diagonal_entries(tile, diagonal=on_diagonal, nonzeros=nnz)
        else:
            rows = np.repeat(np.arange(tile.shape[0], dtype=np.int32), np.diff(tile.indptr))
            cols, counts = tile.indices, tile.data
            keep = counts != 0
            if on_diagonal:
                keep &= rows != cols
            if not keep.all():
                rows, cols, counts = rows[keep], cols[keep], counts[keep]
        write_table(
            pa.Table.from_arrays(
                [
                    pa.array(rows.astype(np.int32, copy=False)),
                    pa.array(cols.astype(np.int32, copy=False)),
                    pa.array(counts.astype(np.int32, copy=False)),
                ],
                schema=TILE_SCHEMA,
            ),
            path,
        )
    info = TileInfo(
        row_block=row_block,
        col_block=col_block,
        layout=layout,
        path=path,
        nnz=nnz,
        sum_of_squares=float(squares),
    )
    return info, diagonal


def tile_plans(
    client: Client, columns: list[Future], transposed: list[Future]
) -> dict[tuple[int, int], TilePlan]:
    """How each tile (b, c), b <= c, is computed: dense or sparse, in one row range or several.

    The multiply-adds of tile (b, c) are Σ_u (likes of u in b)(likes of u in c),
    and popular items crowd into the first blocks: at ML-20M's shape one
    diagonal tile holds a third of all the work, and computed in one task it
    bounded the stage's wall time while the other worker idled. Tiles with
    more than :data:`PIECE_SHARE` of the total work are cut into row pieces
    of about that much work each (computed as separate tasks, then
    assembled: the stored tile is the same, bit for bit).
    """
    coordinates = upper_triangle(len(columns))
    planned = client.gather(
        [client.submit(tile_work, transposed[b], columns[c], b == c) for b, c in coordinates]
    )
    totals = [float(work.sum()) for _, work in planned]
    share = PIECE_SHARE * sum(totals)
    return {
        (b, c): TilePlan(
            dense=dense, row_ranges=row_pieces(work, math.ceil(total / share) if share > 0 else 1)
        )
        for (b, c), (dense, work), total in zip(coordinates, planned, totals, strict=True)
    }


def cooccurrence_blocks(client: Client, ingest: IngestResult, work_dir: str | Path) -> CooccurrenceResult:
    """Compute and store the tiles of X = SᵀS on the cluster of ``client``."""
    if ingest.n_likes == 0:
        raise InputError(
            f"no rating reaches the like threshold {ingest.like_threshold}: S is empty; "
            "lower --like-threshold",
            column=ingest.item_column,
        )
    directory = join(str(work_dir), COOCCURRENCE_DIR)
    if exists(directory):
        delete_prefix(directory)
    tiles_dir = join(directory, "tiles")
    make_dirs(tiles_dir)
    user_grid, item_grid = ingest.user_grid, ingest.item_grid

    slabs_per_user_block = [
        client.submit(
            liked_slabs,
            str(ingest.ratings_path(p)),
            start,
            stop - start,
            item_grid,
            ingest.like_threshold,
        )
        for p, start, stop in user_grid
    ]
    columns = [
        client.submit(item_block_slab, *slabs_per_user_block, block=b) for b in range(item_grid.n_blocks)
    ]
    del slabs_per_user_block
    transposed = [client.submit(transposed_slab, column) for column in columns]
    plans = tile_plans(client, columns, transposed)
    # Row blocks of popular items come first and hold the costliest tiles:
    # submitted first, they start first, and the cheap tail fills the gaps.
    stored = []
    for b, c in upper_triangle(item_grid.n_blocks):
        plan, diagonal = plans[b, c], b == c
        if len(plan.row_ranges) == 1:
            tile = client.submit(
                cooccurrence_tile, transposed[b], columns[c], dense=plan.dense, diagonal=diagonal
            )
        else:
            parts = [
                client.submit(
                    tile_rows, transposed[b], columns[c], start, stop, dense=plan.dense, diagonal=diagonal
                )
                for start, stop in plan.row_ranges
            ]
            tile = client.submit(assembled_tile, *parts, diagonal=diagonal)
        stored.append(client.submit(store_tile, tile, b, c, str(tiles_dir)))
    results: list[tuple[TileInfo, np.ndarray | None]] = client.gather(stored)
    del columns, transposed

    tiles = [info for info, _ in results]
    diagonal = np.concatenate([diag for info, diag in results if info.row_block == info.col_block])
    write_table(
        pa.table({"item": pa.array(np.arange(ingest.n_items, dtype=np.int32)), "count": pa.array(diagonal)}),
        join(directory, "diagonal.parquet"),
    )
    # Tiles off the diagonal stand for themselves and their transpose.
    weight = {True: 1, False: 2}
    result = CooccurrenceResult(
        directory=directory,
        n_items=ingest.n_items,
        block_size=ingest.block_size,
        nnz_offdiagonal=sum(t.nnz * weight[t.row_block == t.col_block] for t in tiles),
        offdiagonal_sum_of_squares=sum(t.sum_of_squares * weight[t.row_block == t.col_block] for t in tiles),
        tiles=tiles,
    )
    write_bytes(join(directory, "summary.json"), result.model_dump_json(indent=2).encode())
    logger.info(
        "co-occurrence: %d tiles (%d dense), %d off-diagonal non-zeros",
        len(tiles),
        sum(t.layout == "dense" for t in tiles),
        result.nnz_offdiagonal,
    )
    return result
