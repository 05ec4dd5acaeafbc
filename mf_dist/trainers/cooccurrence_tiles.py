"""The stored tiles of X₀ (X = SᵀS without its diagonal) resident on the workers, and products with them.

Tiles are loaded once onto a worker's device (its GPU when it has one) and
stay there for the whole run; only factor blocks (rows × k) travel to them.
X₀ is symmetric and only tiles (b, c) with b ≤ c are stored: tile (b, c)
also gives X₀_cb = X₀_bcᵀ. Used by the co-occurrence trainers and by NMF of X.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch
from distributed import Future

from mf_dist.models import cooccurrence as objective
from mf_dist.runtime.cluster import compute_device
from mf_dist.storage.tiles import CooccurrenceResult, TileInfo, load_tile
from mf_dist.trainers.base import TaskSubmitter

# Sparse CSR matmul in torch warns that it is beta on every first use.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

TileKey = tuple[int, int]


def csr_tensor(matrix: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    return torch.sparse_csr_tensor(
        torch.from_numpy(matrix.indptr.astype(np.int64)),
        torch.from_numpy(matrix.indices.astype(np.int64)),
        torch.from_numpy(matrix.data.astype(np.float32)),
        size=matrix.shape,
        # scipy's CSR is already canonical; checking it again costs a pass.
        check_invariants=False,
    ).to(device)


class ResidentTile:
    """A tile of X₀ as float32 tensors on a worker's device, kept for the whole run.

    Dense tiles hold one tensor; sparse ones hold X₀_bc and X₀_bcᵀ as CSR
    (a CSC product is an order of magnitude slower). Dask cannot serialise
    sparse CSR tensors, so a tile that must move (a lost worker, a
    rebalance) travels as scipy arrays and lands on the receiving worker's
    device. ``__sizeof__`` reports the real footprint so that the scheduler
    sends the small factor blocks to the tile rather than the reverse.
    """

    def __init__(self, tile: np.ndarray | sp.csr_matrix, device_preference: str) -> None:
        self.source = tile
        self.device_preference = device_preference
        device = compute_device(device_preference)
        if isinstance(tile, np.ndarray):
            self.forward = torch.from_numpy(tile.astype(np.float32)).to(device)
            self.transposed: torch.Tensor | None = None
        else:
            self.forward = csr_tensor(tile, device)
            self.transposed = csr_tensor(tile.T.tocsr(), device)

    def __reduce__(self) -> tuple:
        return (ResidentTile, (self.source, self.device_preference))

    def __sizeof__(self) -> int:
        if isinstance(self.source, np.ndarray):
            return 2 * self.source.nbytes
        return 4 * (self.source.data.nbytes + self.source.indices.nbytes + self.source.indptr.nbytes)


def load_tile_tensors(info: TileInfo, shape: tuple[int, int], device_preference: str) -> ResidentTile:
    """A stored tile, loaded onto this worker's device."""
    return ResidentTile(load_tile(info, shape), device_preference)


def load_resident_tiles(
    submit: TaskSubmitter, cooccurrence: CooccurrenceResult, load: Callable[..., object], *args: object
) -> dict[TileKey, Future]:
    """Futures of every stored tile, by (row block, column block) with b ≤ c, in the stored order.

    Each is ``load(info, (rows, cols), *args)`` on a worker, e.g.
    :func:`load_tile_tensors` with the device preference.
    """
    grid = cooccurrence.item_grid
    return {
        (info.row_block, info.col_block): submit(
            load, info, (grid.size(info.row_block), grid.size(info.col_block)), *args
        )
        for info in cooccurrence.tiles
    }


def tile_products(
    tile: ResidentTile, row_vectors: torch.Tensor, col_vectors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(X₀_bc V_c, X₀_bcᵀ V_b) computed on the tile's device, returned on the CPU."""
    device = tile.forward.device
    a, b = objective.tile_products(
        tile.forward, tile.transposed, row_vectors.to(device), col_vectors.to(device)
    )
    return a.cpu(), b.cpu()


def tile_product(
    tile: ResidentTile, vectors: torch.Tensor, transpose: bool, dtype: torch.dtype
) -> torch.Tensor:
    """X₀_bc V_c (``transpose=False``) or X₀_bcᵀ V_b, on the tile's device, returned on the CPU."""
    device = tile.forward.device
    if not transpose:
        matrix = tile.forward
    else:
        matrix = tile.transposed if tile.transposed is not None else tile.forward.T
    return (matrix.to(dtype) @ vectors.to(device=device, dtype=dtype)).cpu()


def tile_product_parts(
    submit: TaskSubmitter,
    tiles: dict[TileKey, Future],
    vectors: list[Future],
    dtype: torch.dtype,
) -> list[list[Future]]:
    """Per row block, the futures of the tile products that sum to (X₀V)_b.

    ``tiles`` maps (b, c), b ≤ c, to :class:`ResidentTile` futures (X₀ is
    symmetric, so tile (b, c) also gives X₀_cb = X₀_bcᵀ); ``vectors`` holds
    one tensor future per block. Each stored tile is used once per direction;
    a diagonal tile is symmetric itself and needs one product, not two. The
    parts come in tile order, so a sum over them does not depend on which
    worker finishes first.
    """
    parts: list[list[Future]] = [[] for _ in vectors]
    for (b, c), tile in tiles.items():
        parts[b].append(submit(tile_product, tile, vectors[c], False, dtype))
        if b != c:
            parts[c].append(submit(tile_product, tile, vectors[b], True, dtype))
    return parts
