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

Both solvers' trainers live in this one module, :class:`NMFMultiplicative`
and :class:`NMFGradient`: they share the targets, the sweeps and the loss,
and differ only in the row update (:mod:`mf_dist.models.nmf`) and the advice
on divergence.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from distributed import Future

from mf_dist.blocks import BlockGrid, RowBlock
from mf_dist.models import nmf as objective
from mf_dist.runtime.cluster import compute_device
from mf_dist.solvers.rows import gram
from mf_dist.storage.ingested import IngestResult
from mf_dist.storage.store import read_table
from mf_dist.storage.tiles import CooccurrenceResult, load_cooccurrence_result
from mf_dist.trainers.base import TaskSubmitter, Trainer, TrainingInputs
from mf_dist.trainers.cooccurrence_tiles import (
    ResidentTile,
    load_resident_tiles,
    load_tile_tensors,
    tile_product_parts,
)
from mf_dist.trainers.epoch_loop import Measurement
from mf_dist.trainers.liked_products import LikedGramProducts, liked_products_if_cheaper
from mf_dist.trainers.tasks import pick, sum_picked, sum_tensors


def read_diagonal_block(path: str, start: int, stop: int) -> torch.Tensor:
    """The like counts X_ii of items [start, stop) as float32 (runs on a worker)."""
    table = read_table(path, columns=["item", "count"], filters=[("item", ">=", start), ("item", "<", stop)])
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
    f, other = vectors.to(device), other_gram.to(device)
    cross = sum_tensors(*cross_parts).to(device) if cross_parts else torch.zeros_like(f)
    if solver == "mu":
        new = objective.multiplicative_rows(f, cross, other)
    else:
        new = objective.projected_gradient_rows(f, cross, other, learning_rate)
    return new.cpu(), gram(new).cpu(), float(objective.block_inner(new, cross))


def nonnegative_vectors(block: RowBlock) -> torch.Tensor:
    """A given block (checkpoint or warm start) made feasible: |v| (a no-op on NMF checkpoints).

    Warm-start rows of new ids are drawn from a normal distribution; taking
    |v| rather than max(0, v) keeps them non-zero, since the multiplicative
    update can never move an entry away from 0.
    """
    return block.vectors.abs()


class CooccurrenceTarget:
    """X = SᵀS with its diagonal, as resident tiles plus diagonal blocks; rows and columns are items."""

    names = ("items", "contexts")

    def __init__(self, submit: TaskSubmitter, cooccurrence: CooccurrenceResult, device: str) -> None:
        self.submit = submit
        self.row_grid = self.col_grid = cooccurrence.item_grid
        self.n_rows = self.n_cols = cooccurrence.n_items
        self.tiles = load_resident_tiles(submit, cooccurrence, load_tile_tensors, device)
        self.diagonal = [
            submit(read_diagonal_block, str(cooccurrence.diagonal_path), start, stop)
            for _, start, stop in self.row_grid
        ]
        diagonal_sums = submit.client.gather([submit(squared_sum, d) for d in self.diagonal])
        self.diagonal_total = sum(s for s, _ in diagonal_sums)
        self.squared_norm = cooccurrence.offdiagonal_sum_of_squares + sum(q for _, q in diagonal_sums)

    def mean(self) -> float:
        """mean(X) over all n² entries, off-diagonal tiles counted for their transpose too."""
        totals = self.submit.client.gather([self.submit(tile_total, tile) for tile in self.tiles.values()])
        off = sum(t * (1 if b == c else 2) for (b, c), t in zip(self.tiles, totals, strict=True))
        return (off + self.diagonal_total) / max(1, self.n_rows * self.n_cols)

    def forward(self, vectors: list[Future]) -> list[list[Future]]:
        """The parts of (X V)_b for every block of V (X symmetric: also of Xᵀ V)."""
        parts = tile_product_parts(self.submit, self.tiles, vectors, torch.float32)
        for part, d, v in zip(parts, self.diagonal, vectors, strict=True):
            part.append(self.submit(diagonal_part, d, v))
        return parts

    backward = forward


class LikedCooccurrenceTarget:
    """X = SᵀS with its diagonal, never stored: X V = Sᵀ(S V) from the likes; rows and columns are items."""

    names = ("items", "contexts")

    def __init__(
        self, submit: TaskSubmitter, cooccurrence: CooccurrenceResult, products: LikedGramProducts
    ) -> None:
        self.products = products
        self.row_grid = self.col_grid = cooccurrence.item_grid
        self.n_rows = self.n_cols = cooccurrence.n_items
        diagonal = submit.client.gather([submit(squared_sum, d, anywhere=True) for d in products.counts])
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

    def __init__(self, submit: TaskSubmitter, ingest: IngestResult, device: str) -> None:
        self.products = LikedGramProducts(submit.client, ingest, device, submit.resources)
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


class NMFTrainer(Trainer):
    """W Hᵀ ≈ X by whole-matrix alternating updates on row blocks; a subclass names the row update."""

    solver: ClassVar[str]
    """The row update of :func:`update_block`: ``mu`` (multiplicative) or ``gradient`` (projected)."""

    def __init__(self, inputs: TrainingInputs) -> None:
        super().__init__(inputs)
        self.target = self._target(inputs)
        self.norm = max(self.target.squared_norm, 1e-300)
        row_name, col_name = self.target.names
        self._scale: float | None = None
        self.w = self._start(inputs.initial.get(row_name), self.target.row_grid, 0)
        self.h = self._start(inputs.initial.get(col_name), self.target.col_grid, 1)
        self.h_gram: Future | None = None

    def _target(self, inputs: TrainingInputs) -> Target:
        """The X that ``settings.target`` names, its products from the tiles or the likes."""
        settings = self.settings
        if settings.target == "ratings":
            return RatingsTarget(self._submit, self.ingest, settings.device)
        cooccurrence = load_cooccurrence_result(inputs.work_dir)
        liked = liked_products_if_cheaper(self.client, self.ingest, cooccurrence, settings, self.resources)
        if liked is None:
            return CooccurrenceTarget(self._submit, cooccurrence, settings.device)
        return LikedCooccurrenceTarget(self._submit, cooccurrence, liked)

    def _initial_scale(self) -> float:
        if self._scale is None:
            self._scale = objective.initial_scale(self.target.mean(), self.settings.rank)
        return self._scale

    def _start(self, blocks: list[Future] | None, grid: BlockGrid, side: int) -> list[Future]:
        """W or H: the given blocks made feasible, or a random start scale · |N(0, 1)|."""
        # ``or`` draws the scale (a pass over X) only when a side starts at random.
        blocks = blocks or self._random_blocks(grid, self._initial_scale(), side)
        return [self._submit(nonnegative_vectors, b) for b in blocks]

    def _sweep(
        self, blocks: list[Future], cross_parts: list[list[Future]], other_gram: Future
    ) -> tuple[list[Future], Future, Future]:
        """Update every block given the other side: (new blocks, their summed Gram, Σ inner products)."""
        s = self.settings
        updates = [
            self._submit(update_block, v, other_gram, self.solver, s.learning_rate, s.device, *parts)
            for v, parts in zip(blocks, cross_parts, strict=True)
        ]
        new = [self._submit(pick, u, 0) for u in updates]
        return new, self._submit(sum_picked, 1, *updates), self._submit(sum_picked, 2, *updates)

    def run_epoch(self, epoch: int) -> list[Measurement]:
        if self.h_gram is None:
            self.h_gram = self._submit(sum_tensors, *[self._submit(gram, h) for h in self.h])
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

    def _tables(self) -> dict[str, tuple[BlockGrid, list[Future]]]:
        row_name, col_name = self.target.names
        return {
            row_name: (self.target.row_grid, self._as_row_blocks(self.w)),
            col_name: (self.target.col_grid, self._as_row_blocks(self.h)),
        }


class NMFMultiplicative(NMFTrainer):
    """NMF by Lee–Seung multiplicative updates (``--solver mu``)."""

    solver = "mu"

    def divergence_advice(self) -> str:
        return "multiplicative updates stay finite on finite data: check the input for counts beyond float32"


class NMFGradient(NMFTrainer):
    """NMF by projected gradient steps of learning_rate / λ_max(Gram) (``--solver gradient``)."""

    solver = "gradient"

    def divergence_advice(self) -> str:
        return (
            f"lower --learning-rate (now {self.settings.learning_rate}); "
            "at 2 or below a projected-gradient step never raises the loss"
        )
