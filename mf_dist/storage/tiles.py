"""The stored tiles of X = SᵀS: the co-occurrence stage's summary record and tile reader.

The co-occurrence stage writes the tiles under ``<work>/cooccurrence/``; the
trainers read them through this module only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel

from mf_dist.blocks import BlockGrid
from mf_dist.storage.schema import COOCCURRENCE_DIR
from mf_dist.storage.store import join, load_array, read_bytes, read_table


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
    def diagonal_path(self) -> str:
        return join(self.directory, "diagonal.parquet")


def load_tile(info: TileInfo, shape: tuple[int, int]) -> sp.csr_matrix | np.ndarray:
    """Read a stored tile back: a dense int32 array or a CSR matrix."""
    if info.layout == "dense":
        return load_array(info.path)
    table = read_table(info.path)
    return sp.csr_matrix(
        (table["count"].to_numpy(), (table["row"].to_numpy(), table["col"].to_numpy())), shape=shape
    )


def load_cooccurrence_result(work_dir: str | Path) -> CooccurrenceResult:
    path = join(str(work_dir), COOCCURRENCE_DIR, "summary.json")
    return CooccurrenceResult.model_validate(json.loads(read_bytes(path)))
