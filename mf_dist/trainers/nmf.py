"""Sharded non-negative matrix factorization: W Hᵀ ≈ X with W, H ≥ 0 (Frobenius loss).

Two targets (``settings.target``):

- ``cooccurrence``: X = SᵀS with its diagonal (the like counts, stored apart
  from the tiles), items × items; W is the ``items`` table, H the
  ``contexts`` table, both keyed by item id. X is symmetric, so Xᵀ W uses
  the same tiles as X H; where it is cheaper (``settings.x_products``), X H
  is Sᵀ(S H) from the likes and no tile is read
  (:mod:`mf_dist.trainers.liked_products`).
- ``ratings``: X = S, the binary users × items liked matrix; W is the
  ``users`` table, H the ``items`` table. S H and Sᵀ W are sparse products
  with binary CSR blocks of S per user block and of Sᵀ per item block
  (:mod:`mf_dist.trainers.liked_products`, the same blocks X's route uses).

An epoch is one whole update of W given H, then of H given the new W, as
in scikit-learn's ``_fit_multiplicative_update``:

1. HᵀH = Σ_c H_cᵀH_c (k × k); the parts of (XH)_b per row block, where the
   data lives (a product per tile, or per block of liked entries);
2. every W_b updated at once (:mod:`mf_dist.models.nmf`: ``mu`` or projected
   ``gradient``), its cross-product parts summed in its task; WᵀW summed
   from the new blocks;
3. (XᵀW)_c with the new W; every H_c updated; HᵀH of the new H and
   Σ_c ⟨H_c, (XᵀW)_c⟩ = tr(Wᵀ X H) come back with it.

The loss ‖X‖² − 2 tr(WᵀXH) + ⟨WᵀW, HᵀH⟩ of the updated factors therefore
costs no product beyond the two the updates need, and the next epoch reuses
HᵀH. Factors are float32 on the workers; Grams and sums are float64.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from distributed import Client, Future

from mf_dist.blocks import BlockGrid
from mf_dist.models import nmf as objective
from mf_dist.runtime.cluster import compute_device
from mf_dist.settings import TrainSettings
from mf_dist.solvers.gradient import RowBlock
from mf_dist.storage.factor_files import FactorTable, block_seed
from mf_dist.storage.ingested import IngestResult
from mf_dist.storage.tiles import CooccurrenceResult, load_cooccurrence_result
from mf_dist.trainers.cooccurrence import (
    ResidentTile,
    as_row_block,
    load_tile_tensors,
    pick,
    sum_tensors,
)
from mf_dist.trainers.cooccurrence_als import TileKey, tile_product_parts
from mf_dist.trainers.epoch_loop import Measurement
from mf_dist.trainers.liked_products import LikedGramProducts, liked_products_if_cheaper


def read_diagonal_block(path: str, start: int, stop: int) -> torch.Tensor:
    """The like counts X_ii of items [start, stop) as float32 (runs on a worker)."""
    table = pq.read_table(
        path, columns=["item", "count"], filters=[("item", ">=", start), ("item", "<", stop)]
    )
    order = np.argsort(table["item"].to_numpy())
    return torch.from_numpy(table["count"].to_numpy()[order].astype(np.float32))


def diagonal_part(diagonal: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """diag(X)_b V_b: the diagonal's share of (X V)_b."""
    return diagonal[:, None] * vectors


def tile_total(tile: ResidentTile) -> float:
    """Σ of a stored tile's entries (exact: integer counts summed in float64)."""
    return float(tile.source.sum(dtype=np.float64))


def squared_sum(values: torch.Tensor) -> tuple[float, float]:
    """(Σ x, Σ x²) in float64."""
    v = values.double()
    return float(v.sum()), float((v * v).sum())


def update_block(
    vectors: torch.Tensor,
    other_gram: torch.Tensor,
    solver: str,
    learning_rate: float,
    device_preference: str,
    *cross_parts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One update of a row block given the parts of its cross product (XH)_b, summed here in order.

    Returns (new block, its Gram, ⟨new block, (XH)_b⟩).
    """
    device = compute_device(device_preference)
    f, gram = vectors.to(device), other_gram.to(device)
    cross = sum_tensors(*cross_parts).to(device) if cross_parts else torch.zeros_like(f)
    if solver == "mu":
        new = objective.multiplicative_rows(f, cross, gram)
    else:
        new = objective.projected_gradient_rows(f, cross, gram, learning_rate)
    return new.cpu(), objective.gram(new).cpu(), float(objective.block_inner(new, cross))


def block_gram(vectors: torch.Tensor) -> torch.Tensor:
    return objective.gram(vectors)


def nonnegative_vectors(block: RowBlock) -> torch.Tensor:
    """A given block (checkpoint or warm start) made feasible: |v| (a no-op on NMF checkpoints).

    Warm-start rows of new ids are drawn from a normal distribution; taking
    |v| rather than max(0, v) keeps them non-zero, since the multiplicative
    update can never move an entry away from 0.
    """
    return block.vectors.abs()


def sum_picked(index: int, *results: tuple) -> object:
    """Σ of element ``index`` of each result tuple, in order (one task instead of a pick per block)."""
    picked = [r[index] for r in results]
    return sum_tensors(*picked) if isinstance(picked[0], torch.Tensor) else float(sum(picked))


class CooccurrenceTarget:
    """X = SᵀS with its diagonal, as resident tiles plus diagonal blocks; rows and columns are items."""

    names = ("items", "contexts")

    def __init__(
        self,
        client: Client,
        cooccurrence: CooccurrenceResult,
        device: str,
        resources: dict[str, float] | None,
    ) -> None:
        self.client = client
        self.resources = resources
        self.row_grid = self.col_grid = cooccurrence.item_grid
        self.n_rows = self.n_cols = cooccurrence.n_items
        grid = self.row_grid
        self.tiles: dict[TileKey, Future] = {
            (info.row_block, info.col_block): self._submit(
                load_tile_tensors, info, (grid.size(info.row_block), grid.size(info.col_block)), device
            )
            for info in cooccurrence.tiles
        }
        self.diagonal = [
            self._submit(read_diagonal_block, str(cooccurrence.diagonal_path), start, stop)
            for _, start, stop in grid
        ]
        diagonal_sums = client.gather([self._submit(squared_sum, d) for d in self.diagonal])
        self.diagonal_total = sum(s for s, _ in diagonal_sums)
        self.squared_norm = cooccurrence.offdiagonal_sum_of_squares + sum(q for _, q in diagonal_sums)

    def _submit(self, function: Callable, *args: object) -> Future:
        return self.client.submit(function, *args, resources=self.resources, pure=False)

    def mean(self) -> float:
        """mean(X) over all n² entries, off-diagonal tiles counted for their transpose too."""
        totals = self.client.gather([self._submit(tile_total, tile) for tile in self.tiles.values()])
        off = sum(t * (1 if b == c else 2) for (b, c), t in zip(self.tiles, totals, strict=True))
        return (off + self.diagonal_total) / max(1, self.n_rows * self.n_cols)

    def forward(self, vectors: list[Future]) -> list[list[Future]]:
        """The parts of (X V)_b for every block of V (X symmetric: also of Xᵀ V)."""
        parts = tile_product_parts(self.client, self.tiles, vectors, self.resources, torch.float32)
        for part, d, v in zip(parts, self.diagonal, vectors, strict=True):
            part.append(self._submit(diagonal_part, d, v))
        return parts

    backward = forward


class LikedCooccurrenceTarget:
    """X = SᵀS with its diagonal, never stored: X V = Sᵀ(S V) from the likes; rows and columns are items."""

    names = ("items", "contexts")

    def __init__(self, client: Client, cooccurrence: CooccurrenceResult, products: LikedGramProducts) -> None:
        self.client = client
        self.products = products
        self.row_grid = self.col_grid = cooccurrence.item_grid
        self.n_rows = self.n_cols = cooccurrence.n_items
        diagonal = client.gather([client.submit(squared_sum, d) for d in products.counts])
        self.squared_norm = cooccurrence.offdiagonal_sum_of_squares + sum(q for _, q in diagonal)

    def mean(self) -> float:
        return self.products.total() / max(1, self.n_rows * self.n_cols)

    def forward(self, vectors: list[Future]) -> list[list[Future]]:
        """(X V)_b for every block of V, one part each (X symmetric: also Xᵀ V)."""
        return [[product] for product in self.products.products(vectors)]

    backward = forward


class RatingsTarget:
    """X = S, the binary liked matrix, as CSR blocks of S per user block and of Sᵀ per item block."""

    names = ("users", "items")

    def __init__(
        self, client: Client, ingest: IngestResult, device: str, resources: dict[str, float] | None
    ) -> None:
        self.products = LikedGramProducts(client, ingest, device, resources)
        self.row_grid, self.col_grid = ingest.user_grid, ingest.item_grid
        self.n_rows, self.n_cols = ingest.n_users, ingest.n_items
        # Binary S: ‖S‖² is the number of liked (user, item) pairs, unique after ingest.
        self.squared_norm = float(self.products.n_likes)

    def mean(self) -> float:
        return self.products.n_likes / max(1, self.n_rows * self.n_cols)

    def forward(self, item_vectors: list[Future]) -> list[list[Future]]:
        """(S H)_b for every user block (one part each)."""
        return [[product] for product in self.products.user_products(item_vectors)]

    def backward(self, user_vectors: list[Future]) -> list[list[Future]]:
        """(Sᵀ W)_c for every item block (one part each)."""
        return [[product] for product in self.products.item_products(user_vectors)]


Target = CooccurrenceTarget | LikedCooccurrenceTarget | RatingsTarget


class NMFModel:
    """W Hᵀ ≈ X by whole-matrix alternating updates on row blocks; see the module docstring."""

    def __init__(
        self,
        client: Client,
        target: Target,
        settings: TrainSettings,
        resources: dict[str, float] | None,
        initial: dict[str, list[Future]] | None = None,
    ) -> None:
        self.client = client
        self.target = target
        self.settings = settings
        self.resources = resources
        self.norm = max(target.squared_norm, 1e-300)
        initial = initial or {}
        row_name, col_name = target.names
        self._scale: float | None = None
        self.w = self._start(initial.get(row_name), target.row_grid, 0)
        self.h = self._start(initial.get(col_name), target.col_grid, 1)
        self.h_gram: Future | None = None

    def _submit(self, function: Callable, *args: object) -> Future:
        return self.client.submit(function, *args, resources=self.resources, pure=False)

    def _start(self, blocks: list[Future] | None, grid: BlockGrid, side: int) -> list[Future]:
        if blocks:
            return [self._submit(nonnegative_vectors, b) for b in blocks]
        if self._scale is None:
            self._scale = objective.initial_scale(self.target.mean(), self.settings.rank)
        return [
            self._submit(
                objective.initial_factor,
                stop - start,
                self.settings.rank,
                self._scale,
                block_seed(self.settings.seed, 0, side, block),
            )
            for block, start, stop in grid
        ]

    def _sweep(
        self, blocks: list[Future], cross_parts: list[list[Future]], other_gram: Future
    ) -> tuple[list[Future], Future, Future]:
        """Update every block given the other side: (new blocks, their summed Gram, Σ inner products)."""
        s = self.settings
        updates = [
            self._submit(update_block, v, other_gram, s.solver, s.learning_rate, s.device, *parts)
            for v, parts in zip(blocks, cross_parts, strict=True)
        ]
        new = [self._submit(pick, u, 0) for u in updates]
        return new, self._submit(sum_picked, 1, *updates), self._submit(sum_picked, 2, *updates)

    def run_epoch(self, epoch: int) -> list[Measurement]:
        if self.h_gram is None:
            self.h_gram = self._submit(sum_tensors, *[self._submit(block_gram, h) for h in self.h])
        self.w, w_gram, _ = self._sweep(self.w, self.target.forward(self.h), self.h_gram)
        self.h, self.h_gram, inner = self._sweep(self.h, self.target.backward(self.w), w_gram)
        inner_value, w_gram_value, h_gram_value = self.client.gather([inner, w_gram, self.h_gram])
        loss = float(
            objective.total_loss(
                self.target.squared_norm,
                torch.tensor(inner_value, dtype=torch.float64),
                w_gram_value,
                h_gram_value,
            )
        )
        return [Measurement(epoch, loss, {"relative_loss": loss / self.norm})]

    def finish(self) -> list[Measurement]:
        return []

    def factor_blocks(self) -> dict[str, tuple[FactorTable, list[Future]]]:
        row_name, col_name = self.target.names
        return {
            row_name: (self._layout(row_name, self.target.row_grid), self._row_blocks(self.w)),
            col_name: (self._layout(col_name, self.target.col_grid), self._row_blocks(self.h)),
        }

    def _row_blocks(self, vectors: list[Future]) -> list[Future]:
        return [self._submit(as_row_block, v, None) for v in vectors]

    def _layout(self, name: str, grid: BlockGrid) -> FactorTable:
        return FactorTable(
            name=name,
            directory="",
            n_rows=grid.n_rows,
            block_size=grid.block_size,
            rank=self.settings.rank,
            has_bias=False,
        )

    def divergence_advice(self) -> str:
        if self.settings.solver == "gradient":
            return (
                f"lower --learning-rate (now {self.settings.learning_rate}); "
                "at 2 or below a projected-gradient step never raises the loss"
            )
        return "multiplicative updates stay finite on finite data: check the input for counts beyond float32"


def build_nmf(
    client: Client,
    work_dir: str | Path,
    ingest: IngestResult,
    settings: TrainSettings,
    resources: dict[str, float] | None,
    initial: dict[str, list[Future]] | None,
) -> NMFModel:
    """The NMF model on the target ``settings.target`` names (co-occurrence tiles or liked entries)."""
    target: Target
    if settings.target == "cooccurrence":
        cooccurrence = load_cooccurrence_result(work_dir)
        liked = liked_products_if_cheaper(client, ingest, cooccurrence, settings, resources)
        if liked is None:
            target = CooccurrenceTarget(client, cooccurrence, settings.device, resources)
        else:
            target = LikedCooccurrenceTarget(client, cooccurrence, liked)
    else:
        target = RatingsTarget(client, ingest, settings.device, resources)
    return NMFModel(client, target, settings, resources, initial)
