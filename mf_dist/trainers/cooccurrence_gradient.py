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

The weighted loss (``--loss weighted``) has its own gradient trainer,
:class:`~mf_dist.trainers.cooccurrence_weighted_gradient.CooccurrenceWeightedGradient`,
which :meth:`CooccurrenceGradient.build` returns for it.
"""

from __future__ import annotations

import torch
from distributed import Future

from mf_dist.blocks import OptimizerState
from mf_dist.models import cooccurrence as objective
from mf_dist.runtime.cluster import compute_device
from mf_dist.settings import TrainSettings
from mf_dist.solvers.gradient import optimizer_step
from mf_dist.solvers.rows import gram
from mf_dist.storage.tiles import CooccurrenceResult
from mf_dist.trainers.base import CooccurrenceTrainer, Trainer, TrainingInputs
from mf_dist.trainers.cooccurrence_tiles import TileKey, load_resident_tiles, load_tile_tensors, tile_products
from mf_dist.trainers.cooccurrence_weighted_gradient import CooccurrenceWeightedGradient
from mf_dist.trainers.epoch_loop import Measurement
from mf_dist.trainers.liked_products import liked_products_if_cheaper
from mf_dist.trainers.tasks import pick, sum_tensors, zeros_like_block


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


def start_scale(cooccurrence: CooccurrenceResult, rank: int) -> float:
    """The standard deviation of V's random start, for either solver of the squared loss.

    Below the data's scale (0.3 of :func:`~mf_dist.models.cooccurrence.initial_scale`)
    the loss falls from the first step; at full scale it begins near twice ‖X₀‖².
    """
    return 0.3 * objective.initial_scale(cooccurrence.offdiagonal_sum_of_squares, cooccurrence.n_items, rank)


class CooccurrenceGradient(CooccurrenceTrainer):
    """Full-batch gradient steps on V; every tensor stays on the workers (module docstring)."""

    @classmethod
    def _variant(cls, settings: TrainSettings) -> type[Trainer]:
        return CooccurrenceWeightedGradient if settings.loss == "weighted" else cls

    def __init__(self, inputs: TrainingInputs) -> None:
        super().__init__(inputs)
        cooccurrence, settings = self.cooccurrence, self.settings
        # X₀V from the likes where that is cheaper; without them, from the stored tiles.
        self.liked = liked_products_if_cheaper(
            self.client, self.ingest, cooccurrence, settings, self.resources
        )
        # Adam's step is in units of the parameters, so the step is taken
        # relative to the data's scale: the same setting works whether X
        # counts in tens or in millions.
        self.step_size = settings.learning_rate * objective.initial_scale(
            cooccurrence.offdiagonal_sum_of_squares, cooccurrence.n_items, settings.rank
        )
        self.norm = max(cooccurrence.offdiagonal_sum_of_squares, 1e-300)
        self.tiles: dict[TileKey, Future] = {}
        if self.liked is None:
            self.tiles = load_resident_tiles(self._submit, cooccurrence, load_tile_tensors, settings.device)
        self.updates_done = 0
        self._start(inputs.initial, start_scale(cooccurrence, settings.rank), with_states=True)

    def _gram_and_cross(self) -> tuple[Future, list[Future]]:
        grams = [self._submit(gram, v) for v in self.vectors]
        total_gram = self._submit(sum_tensors, *grams, anywhere=True)
        if self.liked is not None:
            return total_gram, self.liked.offdiagonal_products(self.vectors)
        parts: list[list[Future]] = [[] for _ in range(self.grid.n_blocks)]
        for (b, c), tile in self.tiles.items():
            products = self._submit(tile_products, tile, self.vectors[b], self.vectors[c])
            parts[b].append(self._submit(pick, products, 0, anywhere=True))
            if b != c:
                parts[c].append(self._submit(pick, products, 1, anywhere=True))
        cross = [
            self._submit(sum_tensors, *part, anywhere=True) if part else self._submit(zeros_like_block, v)
            for part, v in zip(parts, self.vectors, strict=True)
        ]
        return total_gram, cross

    def _loss(self, gram_future: Future, terms: list[tuple[float, float]]) -> float:
        fourth = sum(t[0] for t in terms)
        cross = sum(t[1] for t in terms)
        return float(
            objective.total_loss(
                gram_future.result(),
                torch.tensor(fourth, dtype=torch.float64),
                torch.tensor(cross, dtype=torch.float64),
                self.cooccurrence.offdiagonal_sum_of_squares,
            )
        )

    def run_epoch(self, epoch: int) -> list[Measurement]:
        """One step on every block; the loss it measures is the one before the step (epoch − 1)."""
        total_gram, cross = self._gram_and_cross()
        s = self.settings
        assert self.states is not None
        updates = [
            self._submit(update_block, v, st, total_gram, x, self.step_size, s.optimizer, s.device)
            for v, st, x in zip(self.vectors, self.states, cross, strict=True)
        ]
        self.vectors = [self._submit(pick, u, 0, anywhere=True) for u in updates]
        self.states = [self._submit(pick, u, 1, anywhere=True) for u in updates]
        terms = self.client.gather([self._submit(pick, u, 2, anywhere=True) for u in updates])
        self.updates_done = epoch
        return [self._measure(epoch - 1, self._loss(total_gram, terms))]

    def finish(self) -> list[Measurement]:
        total_gram, cross = self._gram_and_cross()
        terms = self.client.gather(
            [self._submit(loss_terms, v, x) for v, x in zip(self.vectors, cross, strict=True)]
        )
        return [self._measure(self.updates_done, self._loss(total_gram, terms))]
