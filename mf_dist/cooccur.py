"""Co-occurrence stage: X = SᵀS in item-block tiles, never as one items × items matrix.

S is the binary users × items "liked" matrix. Each user block's ratings
file is read once and cut into item blocks; the pieces of item block b are
stacked into the column slab S_{:,b} (all users, scipy CSR), kept with its
transpose on the workers (S in total, twice: O(likes) memory). Tile (b, c),
b <= c, is ``S_{:,b}ᵀ S_{:,c}``, computed by one task whose memory is
bounded by two column slabs and one B × B tile. X is symmetric, so only
b <= c is stored; the diagonal (per-item like counts) is stored apart and is
zero inside the tiles.

Each tile is written in the layout its density calls for: a dense ``.npy``
tile (int32) when more than :data:`DENSE_TILE_DENSITY` of it is non-zero,
else sparse COO in Parquet (``row``, ``col``, ``count``; indices local to the
tile).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from distributed import Client, Future
from pydantic import BaseModel

from mf_dist.blocks import BlockGrid, upper_triangle
from mf_dist.errors import InputError
from mf_dist.ingest import IngestResult, liked_mask
from mf_dist.schema import COOCCURRENCE_DIR, TILE_SCHEMA

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


class TileInfo(BaseModel):
    """One stored tile of X (off-diagonal entries only)."""

    row_block: int
    col_block: int
    layout: Literal["dense", "sparse"]
    path: str
    nnz: int
    sum_of_squares: float


class CooccurrenceResult(BaseModel):
    """What the co-occurrence stage wrote."""

    directory: str
    n_items: int
    block_size: int
    nnz_offdiagonal: int
    offdiagonal_sum_of_squares: float
    tiles: list[TileInfo]

    @property
    def item_grid(self) -> BlockGrid:
        return BlockGrid(self.n_items, self.block_size)

    @property
    def diagonal_path(self) -> Path:
        return Path(self.directory) / "diagonal.parquet"


def liked_slabs(
    ratings_path: str,
    user_start: int,
    n_users: int,
    item_grid: BlockGrid,
    like_threshold: float | None,
) -> list[sp.csr_matrix]:
    """S for one user block, cut into one CSR slab per item block (users × block items, int32)."""
    table = pq.read_table(ratings_path)
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
    """S_{:,b}: item block ``block`` of every user block stacked (all users × block items, CSR)."""
    return sp.vstack([slabs[block] for slabs in user_block_slabs], format="csr")


def transposed_slab(slab: sp.csr_matrix) -> sp.csr_matrix:
    """S_{:,b}ᵀ as CSR (block items × users): the left operand of every tile in row block b."""
    return slab.T.tocsr()


def cooccurrence_tile(left_transposed: sp.csr_matrix, right: sp.csr_matrix) -> sp.csr_matrix:
    """Tile (b, c) of X: ``S_{:,b}ᵀ S_{:,c}``, exact in int32.

    Both operands are built once per item block and shared by every tile of
    its row or column: stacking and transposing them per tile cost more than
    the product itself. Per-tile products are also faster than one big one
    (about half the time of scipy's whole ``SᵀS`` in sum), the accumulator of
    each output row staying in cache.
    """
    return left_transposed @ right


def cooccurrence_rows(
    left_transposed: sp.csr_matrix, right: sp.csr_matrix, start: int, stop: int
) -> sp.csr_matrix:
    """Rows ``[start, stop)`` of tile (b, c): the same rows :func:`cooccurrence_tile` would give."""
    return left_transposed[start:stop] @ right


def user_like_counts(column_slab: sp.csr_matrix) -> np.ndarray:
    """Each user's likes inside one item block (all users, int64): the row lengths of S_{:,c}."""
    return np.diff(column_slab.indptr).astype(np.int64)


def tile_row_work(left_transposed: sp.csr_matrix, right_counts: np.ndarray) -> np.ndarray:
    """Multiply-adds of each row of tile (b, c): Σ over the users who like item i of their likes in c."""
    return left_transposed @ right_counts


def row_pieces(work: np.ndarray, pieces: int) -> list[tuple[int, int]]:
    """Cut rows ``[0, len(work))`` into at most ``pieces`` non-empty ranges of about equal total work."""
    if pieces <= 1 or len(work) <= 1:
        return [(0, len(work))]
    cumulative = np.cumsum(work, dtype=np.float64)
    targets = cumulative[-1] * np.arange(1, pieces) / pieces
    # Each cut goes after the row in which its target share of the work is reached.
    cuts = np.unique(np.searchsorted(cumulative, targets, side="left") + 1)
    bounds = [0, *[int(cut) for cut in cuts if 0 < cut < len(work)], len(work)]
    return list(itertools.pairwise(bounds))


def stack_rows(*pieces: sp.csr_matrix) -> sp.csr_matrix:
    """A tile from its row pieces, in order (CSR row stacking only concatenates)."""
    return sp.vstack(pieces, format="csr")


def exact_sum_of_squares(counts: np.ndarray) -> int:
    """Σ c² of integer counts, exactly, in slices: no float64 copy of a tile's 10⁷-odd entries."""
    total = 0
    for start in range(0, len(counts), SQUARES_SLICE):
        piece = counts[start : start + SQUARES_SLICE].astype(np.int64)
        total += int(piece @ piece)
    return total


def store_tile(
    tile: sp.csr_matrix, row_block: int, col_block: int, directory: str
) -> tuple[TileInfo, np.ndarray | None]:
    """Write one tile in its layout; for a diagonal tile, return its diagonal apart.

    ``tile`` is the product from :func:`cooccurrence_tile`: a sparse product
    has no duplicate entries, so it is written as it comes, with no COO
    round trip or ``sum_duplicates`` (which cost more than the product did).
    """
    tile = tile.tocsr()
    on_diagonal = row_block == col_block
    diagonal = tile.diagonal().astype(np.int64) if on_diagonal else None
    on_diagonal_counts = np.zeros(0, dtype=np.int64) if diagonal is None else diagonal
    nnz = int(np.count_nonzero(tile.data)) - int(np.count_nonzero(on_diagonal_counts))
    sum_of_squares = float(exact_sum_of_squares(tile.data) - on_diagonal_counts @ on_diagonal_counts)
    density = nnz / max(1, tile.shape[0] * tile.shape[1])
    name = f"tile-{row_block:05d}-{col_block:05d}"
    if density > DENSE_TILE_DENSITY:
        layout = "dense"
        path = Path(directory) / f"{name}.npy"
        dense = tile.toarray().astype(np.int32, copy=False)
        if on_diagonal:
            np.fill_diagonal(dense, 0)
        np.save(path, dense, allow_pickle=False)
    else:
        layout = "sparse"
        path = Path(directory) / f"{name}.parquet"
        rows = np.repeat(np.arange(tile.shape[0], dtype=np.int32), np.diff(tile.indptr))
        cols, counts = tile.indices, tile.data
        keep = counts != 0
        if on_diagonal:
            keep &= rows != cols
        if not keep.all():
            rows, cols, counts = rows[keep], cols[keep], counts[keep]
        pq.write_table(
            pa.Table.from_arrays(
                [
                    pa.array(rows),
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
        path=str(path),
        nnz=nnz,
        sum_of_squares=sum_of_squares,
    )
    return info, diagonal


def load_tile(info: TileInfo, shape: tuple[int, int]) -> sp.csr_matrix | np.ndarray:
    """Read a stored tile back: a dense int32 array or a CSR matrix."""
    if info.layout == "dense":
        return np.load(info.path, allow_pickle=False)
    table = pq.read_table(info.path)
    return sp.csr_matrix(
        (table["count"].to_numpy(), (table["row"].to_numpy(), table["col"].to_numpy())), shape=shape
    )


def tile_row_pieces(
    client: Client, columns: list[Future], transposed: list[Future]
) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """The row ranges each tile (b, c), b <= c, is computed in: one, or several for a crowded tile.

    The multiply-adds of tile (b, c) are Σ_u (likes of u in b)(likes of u in c),
    and popular items crowd into the first blocks: at ML-20M's shape one
    diagonal tile holds a third of all the work, and computed in one task it
    bounded the stage's wall time while the other worker idled. Tiles with
    more than :data:`PIECE_SHARE` of the total work are cut into row pieces
    of about that much work each (computed as separate tasks, then stacked:
    the stored tile is the same, bit for bit).
    """
    n_blocks = len(columns)
    counts = [client.submit(user_like_counts, column) for column in columns]
    coordinates = upper_triangle(n_blocks)
    row_work = client.gather([client.submit(tile_row_work, transposed[b], counts[c]) for b, c in coordinates])
    totals = [float(work.sum()) for work in row_work]
    share = PIECE_SHARE * sum(totals)
    return {
        (b, c): row_pieces(work, math.ceil(total / share) if share > 0 else 1)
        for (b, c), work, total in zip(coordinates, row_work, totals, strict=True)
    }


def cooccurrence_blocks(client: Client, ingest: IngestResult, work_dir: str | Path) -> CooccurrenceResult:
    """Compute and store the tiles of X = SᵀS on the cluster of ``client``."""
    if ingest.n_likes == 0:
        raise InputError(
            f"no rating reaches the like threshold {ingest.like_threshold}: S is empty; "
            "lower --like-threshold",
            column=ingest.item_column,
        )
    directory = Path(work_dir) / COOCCURRENCE_DIR
    if directory.exists():
        shutil.rmtree(directory)
    tiles_dir = directory / "tiles"
    tiles_dir.mkdir(parents=True)
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
    pieces = tile_row_pieces(client, columns, transposed)
    # Row blocks of popular items come first and hold the costliest tiles:
    # submitted first, they start first, and the cheap tail fills the gaps.
    stored = []
    for b, c in upper_triangle(item_grid.n_blocks):
        if len(pieces[b, c]) == 1:
            tile = client.submit(cooccurrence_tile, transposed[b], columns[c])
        else:
            parts = [
                client.submit(cooccurrence_rows, transposed[b], columns[c], start, stop)
                for start, stop in pieces[b, c]
            ]
            tile = client.submit(stack_rows, *parts)
        stored.append(client.submit(store_tile, tile, b, c, str(tiles_dir)))
    results: list[tuple[TileInfo, np.ndarray | None]] = client.gather(stored)
    del columns, transposed

    tiles = [info for info, _ in results]
    diagonal = np.concatenate([diag for info, diag in results if info.row_block == info.col_block])
    pq.write_table(
        pa.table({"item": pa.array(np.arange(ingest.n_items, dtype=np.int32)), "count": pa.array(diagonal)}),
        directory / "diagonal.parquet",
    )
    # Tiles off the diagonal stand for themselves and their transpose.
    weight = {True: 1, False: 2}
    result = CooccurrenceResult(
        directory=str(directory),
        n_items=ingest.n_items,
        block_size=ingest.block_size,
        nnz_offdiagonal=sum(t.nnz * weight[t.row_block == t.col_block] for t in tiles),
        offdiagonal_sum_of_squares=sum(t.sum_of_squares * weight[t.row_block == t.col_block] for t in tiles),
        tiles=tiles,
    )
    (directory / "summary.json").write_text(result.model_dump_json(indent=2))
    logger.info(
        "co-occurrence: %d tiles (%d dense), %d off-diagonal non-zeros",
        len(tiles),
        sum(t.layout == "dense" for t in tiles),
        result.nnz_offdiagonal,
    )
    return result


def load_cooccurrence_result(work_dir: str | Path) -> CooccurrenceResult:
    path = Path(work_dir) / COOCCURRENCE_DIR / "summary.json"
    return CooccurrenceResult.model_validate(json.loads(path.read_text()))
