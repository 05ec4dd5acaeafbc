"""Sharded trainer for the co-occurrence embedding (full-batch Adam on row blocks).

Per epoch, on the workers:

1. G = Σ_b V_bᵀV_b — one k × k block per row block, summed (the all-reduce);
2. (X₀V)_b for every row block: from the stored tiles X₀_bc (b <= c), where
   each tile lives, X₀_bc V_c and X₀_bcᵀ V_b summed per row block; or, when
   that is cheaper, as Sᵀ(S V) − diag(d) V from the likes
   (:mod:`mf_dist.trainers.liked_products`), with no tile loaded at all;
3. per row block: loss terms, gradient 4 (V_b G − diag(‖v‖²) V_b − (X₀V)_b),
   one Adam step.

Tiles (or likes) are loaded once and stay on their worker (on its GPU when it
has one); only the factor blocks (rows × k) and k × k Gram blocks travel. The driver
sees scalars only.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch
from distributed import Client, Future

from mf_dist.models import cooccurrence as objective
from mf_dist.runtime.cluster import compute_device
from mf_dist.settings import TrainSettings
from mf_dist.solvers.gradient import OptimizerState, RowBlock, optimizer_step
from mf_dist.storage.factor_files import FactorTable, block_seed
from mf_dist.storage.tiles import CooccurrenceResult, TileInfo, load_tile
from mf_dist.trainers.epoch_loop import Measurement
from mf_dist.trainers.liked_products import LikedGramProducts

logger = logging.getLogger(__name__)

# Sparse CSR matmul in torch warns that it is beta on every first use.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


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


def initial_block(n_rows: int, rank: int, scale: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, rank, generator=generator) * scale


def block_gram(vectors: torch.Tensor) -> torch.Tensor:
    return objective.gram(vectors)


def sum_tensors(*tensors: torch.Tensor) -> torch.Tensor:
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total += tensor
    return total


def zeros_like_block(vectors: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(vectors)


def tile_products(
    tile: ResidentTile, row_vectors: torch.Tensor, col_vectors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(X₀_bc V_c, X₀_bcᵀ V_b) computed on the tile's device, returned on the CPU."""
    device = tile.forward.device
    a, b = objective.tile_products(
        tile.forward, tile.transposed, row_vectors.to(device), col_vectors.to(device)
    )
    return a.cpu(), b.cpu()


def pick(pair: tuple, index: int) -> object:
    return pair[index]


def update_block(
    vectors: torch.Tensor,
    state: OptimizerState | None,
    gram_matrix: torch.Tensor,
    cross_product: torch.Tensor,
    learning_rate: float,
    optimizer_name: str,
    device_preference: str,
) -> tuple[torch.Tensor, OptimizerState, tuple[float, float]]:
    """Loss terms at the current V_b, then one optimiser step on V_b."""
    device = compute_device(device_preference)
    v = vectors.to(device)
    cross = cross_product.to(device)
    g = gram_matrix.to(device)
    fourth, cross_term = objective.block_loss_terms(v, cross)
    grad = objective.block_gradient(v, g, cross)
    new_vectors, new_state = optimizer_step(v, grad, state, learning_rate, optimizer_name)
    return new_vectors.cpu(), new_state, (float(fourth), float(cross_term))


def loss_terms(vectors: torch.Tensor, cross_product: torch.Tensor) -> tuple[float, float]:
    fourth, cross = objective.block_loss_terms(vectors, cross_product)
    return float(fourth), float(cross)


def as_row_block(vectors: torch.Tensor, state: OptimizerState | None) -> RowBlock:
    return RowBlock(vectors=vectors, state=state or {})


def block_vectors(block: RowBlock) -> torch.Tensor:
    return block.vectors


def block_state(block: RowBlock) -> OptimizerState:
    return block.state


class CooccurrenceGradient:
    """Full-batch gradient steps on V; every tensor stays on the workers (module docstring)."""

    def __init__(
        self,
        client: Client,
        cooccurrence: CooccurrenceResult,
        settings: TrainSettings,
        resources: dict[str, float] | None,
        initial: dict[str, list[Future]] | None = None,
        liked: LikedGramProducts | None = None,
    ) -> None:
        """``liked`` computes X₀V from the likes; without it X₀V comes from the stored tiles."""
        self.client = client
        self.liked = liked
        self.cooccurrence = cooccurrence
        self.settings = settings
        self.grid = cooccurrence.item_grid
        self.device = settings.device
        self.resources = resources
        self.scale = objective.initial_scale(
            cooccurrence.offdiagonal_sum_of_squares, cooccurrence.n_items, settings.rank
        )
        # Starting below the data's scale makes the loss fall from the first
        # step (at full scale it begins near twice ‖X₀‖²).
        start_scale = 0.3 * self.scale
        # Adam's step is in units of the parameters, so the step is taken
        # relative to the start's scale: the same setting works whether X
        # counts in tens or in millions.
        self.step_size = settings.learning_rate * self.scale
        self.norm = max(cooccurrence.offdiagonal_sum_of_squares, 1e-300)
        self.tiles = {
            (info.row_block, info.col_block): self._submit(
                load_tile_tensors,
                info,
                (self.grid.size(info.row_block), self.grid.size(info.col_block)),
                self.device,
            )
            for info in cooccurrence.tiles
            if liked is None
        }
        self.updates_done = 0
        if initial and "items" in initial:
            self.vectors: list[Future] = [self._submit(block_vectors, b) for b in initial["items"]]
            self.states: list[Future | None] = [self._submit(block_state, b) for b in initial["items"]]
        else:
            self.vectors = [
                self._submit(
                    initial_block,
                    stop - start,
                    settings.rank,
                    start_scale,
                    block_seed(settings.seed, 0, block),
                )
                for block, start, stop in self.grid
            ]
            self.states = [None] * self.grid.n_blocks

    def _submit(self, function: Callable, *args: object) -> Future:
        return self.client.submit(function, *args, resources=self.resources, pure=False)

    def _gram_and_cross(self) -> tuple[Future, list[Future]]:
        gram = self.client.submit(
            sum_tensors, *[self._submit(block_gram, v) for v in self.vectors], pure=False
        )
        if self.liked is not None:
            return gram, self.liked.offdiagonal_products(self.vectors)
        parts: list[list[Future]] = [[] for _ in range(self.grid.n_blocks)]
        for (b, c), tile in self.tiles.items():
            products = self._submit(tile_products, tile, self.vectors[b], self.vectors[c])
            parts[b].append(self.client.submit(pick, products, 0))
            if b != c:
                parts[c].append(self.client.submit(pick, products, 1))
        cross = [
            self.client.submit(sum_tensors, *part, pure=False) if part else self._submit(zeros_like_block, v)
            for part, v in zip(parts, self.vectors, strict=True)
        ]
        return gram, cross

    def _loss(self, gram: Future, terms: list[tuple[float, float]]) -> float:
        fourth = sum(t[0] for t in terms)
        cross = sum(t[1] for t in terms)
        gram_matrix = gram.result()
        return float(
            objective.total_loss(
                gram_matrix,
                torch.tensor(fourth, dtype=torch.float64),
                torch.tensor(cross, dtype=torch.float64),
                self.cooccurrence.offdiagonal_sum_of_squares,
            )
        )

    def _measure(self, epoch: int, loss: float) -> Measurement:
        return Measurement(epoch, loss, {"relative_loss": loss / self.norm})

    def run_epoch(self, epoch: int) -> list[Measurement]:
        """One step on every block; the loss it measures is the one before the step (epoch − 1)."""
        gram, cross = self._gram_and_cross()
        s = self.settings
        updates = [
            self._submit(update_block, v, st, gram, x, self.step_size, s.optimizer, self.device)
            for v, st, x in zip(self.vectors, self.states, cross, strict=True)
        ]
        self.vectors = [self.client.submit(pick, u, 0) for u in updates]
        self.states = [self.client.submit(pick, u, 1) for u in updates]
        terms = self.client.gather([self.client.submit(pick, u, 2) for u in updates])
        self.updates_done = epoch
        return [self._measure(epoch - 1, self._loss(gram, terms))]

    def finish(self) -> list[Measurement]:
        gram, cross = self._gram_and_cross()
        terms = self.client.gather(
            [self._submit(loss_terms, v, x) for v, x in zip(self.vectors, cross, strict=True)]
        )
        return [self._measure(self.updates_done, self._loss(gram, terms))]

    def factor_blocks(self) -> dict[str, tuple[FactorTable, list[Future]]]:
        layout = FactorTable(
            name="items",
            directory="",
            n_rows=self.grid.n_rows,
            block_size=self.grid.block_size,
            rank=self.settings.rank,
            has_bias=False,
        )
        blocks = [self._submit(as_row_block, v, st) for v, st in zip(self.vectors, self.states, strict=True)]
        return {"items": (layout, blocks)}

    def divergence_advice(self) -> str:
        return f"lower --learning-rate (now {self.settings.learning_rate})"
