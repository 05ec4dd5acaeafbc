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

import json
import logging
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from distributed import Client
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
    data = tile.data.astype(np.float64)
    diagonal = tile.diagonal().astype(np.int64) if on_diagonal else None
    on_diagonal_counts = np.zeros(0) if diagonal is None else diagonal.astype(np.float64)
    nnz = int(np.count_nonzero(data)) - int(np.count_nonzero(on_diagonal_counts))
    sum_of_squares = float(data @ data - on_diagonal_counts @ on_diagonal_counts)
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
        pq.write_table(
            pa.Table.from_arrays(
                [
                    pa.array(rows[keep]),
                    pa.array(cols[keep].astype(np.int32)),
                    pa.array(counts[keep].astype(np.int32)),
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
    # Row blocks of popular items come first and hold the costliest tiles:
    # submitted first, they start first, and the cheap tail fills the gaps.
    stored = []
    for b, c in upper_triangle(item_grid.n_blocks):
        tile = client.submit(cooccurrence_tile, transposed[b], columns[c])
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
