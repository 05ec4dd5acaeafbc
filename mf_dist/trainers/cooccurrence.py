"""Sharded trainer for the co-occurrence embedding (full-batch Adam on row blocks).

Per epoch, on the workers:

1. G = Σ_b V_bᵀV_b — one k × k block per row block, summed (the all-reduce);
2. for every stored tile X₀_bc (b <= c), where the tile lives: X₀_bc V_c and
   X₀_bcᵀ V_b, summed per row block into (X₀V)_b;
3. per row block: loss terms, gradient 4 (V_b G − diag(‖v‖²) V_b − (X₀V)_b),
   one Adam step.

Tiles are loaded once and stay on their worker (on its GPU when it has one);
only the factor blocks (rows × k) and k × k Gram blocks travel. The driver
sees scalars only.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from distributed import Client, Future

from mf_dist.cluster import compute_device
from mf_dist.cooccur import CooccurrenceResult, TileInfo, load_tile
from mf_dist.errors import TrainingError
from mf_dist.factor_files import EpochRecord, FactorTable, TrainResult, block_seed, write_factor_block
from mf_dist.models import cooccurrence as objective
from mf_dist.solvers.gradient import OptimizerState, adam_step

logger = logging.getLogger(__name__)

EpochCallback = Callable[[EpochRecord], None]

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
    device_preference: str,
) -> tuple[torch.Tensor, OptimizerState, tuple[float, float]]:
    """Loss terms at the current V_b, then one Adam step on V_b."""
    device = compute_device(device_preference)
    v = vectors.to(device)
    cross = cross_product.to(device)
    g = gram_matrix.to(device)
    fourth, cross_term = objective.block_loss_terms(v, cross)
    grad = objective.block_gradient(v, g, cross)
    new_vectors, new_state = adam_step(v, grad, state, learning_rate)
    return new_vectors.cpu(), new_state, (float(fourth), float(cross_term))


def loss_terms(vectors: torch.Tensor, cross_product: torch.Tensor) -> tuple[float, float]:
    fourth, cross = objective.block_loss_terms(vectors, cross_product)
    return float(fourth), float(cross)


def describe_device(device_preference: str) -> str:
    return str(compute_device(device_preference))


def save_block(table: FactorTable, block: int, vectors: torch.Tensor) -> None:
    write_factor_block(table, block, vectors.numpy(), None)


class CooccurrenceTrainer:
    """Drives the epochs from the client; every tensor stays on the workers."""

    def __init__(
        self,
        client: Client,
        cooccurrence: CooccurrenceResult,
        *,
        rank: int,
        learning_rate: float,
        seed: int,
        device: str,
        resources: dict[str, float] | None,
    ) -> None:
        self.client = client
        self.cooccurrence = cooccurrence
        self.grid = cooccurrence.item_grid
        self.rank = rank
        self.device = device
        self.resources = resources
        self.scale = objective.initial_scale(
            cooccurrence.offdiagonal_sum_of_squares, cooccurrence.n_items, rank
        )
        # Starting below the data's scale makes the loss fall from the first
        # step (at full scale it begins near twice ‖X₀‖²).
        start_scale = 0.3 * self.scale
        # Adam's step is in units of the parameters, so the step is taken
        # relative to the start's scale: the same setting works whether X
        # counts in tens or in millions.
        self.step_size = learning_rate * self.scale
        self.tiles = {
            (info.row_block, info.col_block): self._submit(
                load_tile_tensors,
                info,
                (self.grid.size(info.row_block), self.grid.size(info.col_block)),
                device,
            )
            for info in cooccurrence.tiles
        }
        self.vectors: list[Future] = [
            self._submit(initial_block, stop - start, rank, start_scale, block_seed(seed, 0, block))
            for block, start, stop in self.grid
        ]
        self.states: list[Future | None] = [None] * self.grid.n_blocks

    def _submit(self, function: Callable, *args: object) -> Future:
        return self.client.submit(function, *args, resources=self.resources, pure=False)

    def _gram_and_cross(self) -> tuple[Future, list[Future]]:
        gram = self.client.submit(sum_tensors, *[self._submit(block_gram, v) for v in self.vectors])
        parts: list[list[Future]] = [[] for _ in range(self.grid.n_blocks)]
        for (b, c), tile in self.tiles.items():
            products = self._submit(tile_products, tile, self.vectors[b], self.vectors[c])
            parts[b].append(self.client.submit(pick, products, 0))
            if b != c:
                parts[c].append(self.client.submit(pick, products, 1))
        cross = [
            self.client.submit(sum_tensors, *part) if part else self._submit(zeros_like_block, v)
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

    def epoch(self) -> float:
        """One Adam step on every block; returns the loss at the start of the step."""
        gram, cross = self._gram_and_cross()
        updates = [
            self._submit(update_block, v, s, gram, x, self.step_size, self.device)
            for v, s, x in zip(self.vectors, self.states, cross, strict=True)
        ]
        self.vectors = [self.client.submit(pick, u, 0) for u in updates]
        self.states = [self.client.submit(pick, u, 1) for u in updates]
        terms = self.client.gather([self.client.submit(pick, u, 2) for u in updates])
        return self._loss(gram, terms)

    def current_loss(self) -> float:
        gram, cross = self._gram_and_cross()
        terms = self.client.gather(
            [self._submit(loss_terms, v, x) for v, x in zip(self.vectors, cross, strict=True)]
        )
        return self._loss(gram, terms)

    def device_name(self) -> str:
        """The device the training tasks ran on, as a worker reports it."""
        return self._submit(describe_device, self.device).result()

    def save(self, directory: Path) -> FactorTable:
        table = FactorTable(
            name="items",
            directory=str(directory / "items"),
            n_rows=self.grid.n_rows,
            block_size=self.grid.block_size,
            rank=self.rank,
            has_bias=False,
        )
        self.client.gather([self.client.submit(save_block, table, b, v) for b, v in enumerate(self.vectors)])
        return table


def train_cooccurrence(
    client: Client,
    cooccurrence: CooccurrenceResult,
    directory: Path,
    *,
    rank: int,
    epochs: int,
    learning_rate: float,
    seed: int,
    device: str = "auto",
    resources: dict[str, float] | None = None,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Fit V (items × rank) to X = SᵀS; see the module docstring.

    The loss recorded for epoch e is measured after e updates. Raises
    :class:`TrainingError` when the loss becomes non-finite.
    """
    trainer = CooccurrenceTrainer(
        client,
        cooccurrence,
        rank=rank,
        learning_rate=learning_rate,
        seed=seed,
        device=device,
        resources=resources,
    )
    scale = max(cooccurrence.offdiagonal_sum_of_squares, 1e-300)
    history: list[EpochRecord] = []
    started = time.perf_counter()

    def record(epoch: int, loss: float, seconds: float) -> None:
        if not math.isfinite(loss):
            raise TrainingError(
                f"the co-occurrence loss became non-finite at epoch {epoch}: "
                f"lower --learning-rate (now {learning_rate})"
            )
        history.append(
            EpochRecord(epoch=epoch, loss=loss, metrics={"relative_loss": loss / scale}, seconds=seconds)
        )
        if on_epoch:
            on_epoch(history[-1])

    # An update measures the loss before its step, so epoch e's loss arrives
    # with update e + 1, and the loss after the last one is measured apart.
    previous_seconds = 0.0
    for epoch in range(1, epochs + 1):
        loss_before = trainer.epoch()
        if epoch == 1:
            record(0, loss_before, 0.0)
        else:
            record(epoch - 1, loss_before, previous_seconds)
        previous_seconds = time.perf_counter() - started
    record(epochs, trainer.current_loss(), previous_seconds)
    table = trainer.save(directory)
    return TrainResult(
        model="cooccurrence",
        rank=rank,
        epochs=epochs,
        learning_rate=learning_rate,
        history=history,
        tables=[table],
        device=trainer.device_name(),
    )
