"""Sharded trainer for the weighted co-occurrence loss (GloVe/Swivel style, full-batch Adam).

The loss and its gradient are sums over the non-zeros of X₀
(:mod:`mf_dist.models.cooccurrence_weighted`), so per epoch, on the workers:

1. for every stored tile X₀_bc (b ≤ c), where the tile lives: its share of
   the loss and its gradients for V_b and V_c (sparse tiles gather the rows
   of their non-zeros, dense tiles mask by X > 0);
2. per row block: the gradient parts summed in tile order, one optimiser
   step (Adam or Adagrad), whose state travels with the block.

Each tile's weights f(X) and targets t are computed once, when the tile is
loaded, and stay resident beside it. Only factor blocks and gradients travel;
the driver sees scalars. As in :class:`~mf_dist.trainers.cooccurrence_gradient.CooccurrenceGradient`
the loss of an epoch is measured at the factors before its step, and the
last one by :meth:`CooccurrenceWeightedGradient.finish`. The registry names
the squared loss's trainer for the gradient solver; its
:meth:`~mf_dist.trainers.base.Trainer.build` returns this one for ``--loss weighted``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from distributed import Future

from mf_dist.blocks import OptimizerState
from mf_dist.models import cooccurrence_weighted as objective
from mf_dist.runtime.cluster import compute_device
from mf_dist.solvers.gradient import optimizer_step
from mf_dist.storage.tiles import TileInfo, load_tile
from mf_dist.trainers.base import CooccurrenceTrainer, TrainingInputs
from mf_dist.trainers.cooccurrence_tiles import load_resident_tiles
from mf_dist.trainers.epoch_loop import Measurement
from mf_dist.trainers.tasks import pick


class WeightedTile:
    """A tile's non-zeros with their weights f(X) and targets t, resident on a worker's device.

    Dense tiles keep B_b × B_c weight and target matrices (zero where X is);
    sparse ones keep the entries' (row, col, f, t). Like
    :class:`~mf_dist.trainers.cooccurrence_tiles.ResidentTile` it travels as the
    source arrays and is rebuilt where it lands, and reports its real size.
    """

    def __init__(
        self,
        tile: np.ndarray | sp.csr_matrix,
        x_max: float,
        power: float,
        log_target: bool,
        device_preference: str,
    ) -> None:
        self.source = tile
        self.settings = (x_max, power, log_target, device_preference)
        device = compute_device(device_preference)
        if isinstance(tile, np.ndarray):
            counts = torch.from_numpy(tile.astype(np.float32)).to(device)
            self.rows: torch.Tensor | None = None
            self.cols: torch.Tensor | None = None
        else:
            coo = tile.tocoo()
            self.rows = torch.from_numpy(coo.row.astype(np.int64)).to(device)
            self.cols = torch.from_numpy(coo.col.astype(np.int64)).to(device)
            counts = torch.from_numpy(coo.data.astype(np.float32)).to(device)
        self.weight = objective.weights(counts, x_max, power)
        self.target = objective.targets(counts, log_target)

    def __reduce__(self) -> tuple:
        return (WeightedTile, (self.source, *self.settings))

    def __sizeof__(self) -> int:
        if isinstance(self.source, np.ndarray):
            return 3 * self.source.nbytes
        return 8 * self.source.nnz * 4


def load_weighted_tile(
    info: TileInfo, shape: tuple[int, int], x_max: float, power: float, log_target: bool, device: str
) -> WeightedTile:
    """A stored tile with its weights and targets, loaded onto this worker's device."""
    return WeightedTile(load_tile(info, shape), x_max, power, log_target, device)


def tile_terms(
    tile: WeightedTile, row_vectors: torch.Tensor, col_vectors: torch.Tensor, multiplicity: int
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(loss share, ∂/∂V_b, ∂/∂V_c) of one tile, computed on its device, gradients on the CPU."""
    device = tile.weight.device
    v_b, v_c = row_vectors.to(device), col_vectors.to(device)
    if tile.rows is None or tile.cols is None:
        loss, grad_b, grad_c = objective.dense_tile_terms(tile.weight, tile.target, v_b, v_c, multiplicity)
    else:
        loss, grad_b, grad_c = objective.sparse_tile_terms(
            tile.rows, tile.cols, tile.weight, tile.target, v_b, v_c, multiplicity
        )
    return float(loss), grad_b.cpu(), grad_c.cpu()


def target_moments(tile: WeightedTile, multiplicity: int) -> tuple[float, float, int]:
    """(Σ f t², Σ t², number of non-zeros) over the ordered pairs a tile stands for."""
    if tile.rows is None:
        nonzero = tile.weight > 0
        weight, target = tile.weight[nonzero].double(), tile.target[nonzero].double()
    else:
        weight, target = tile.weight.double(), tile.target.double()
    return (
        multiplicity * float((weight * target**2).sum()),
        multiplicity * float((target**2).sum()),
        multiplicity * len(target),
    )


def step_block(
    vectors: torch.Tensor,
    state: OptimizerState | None,
    learning_rate: float,
    optimizer_name: str,
    device_preference: str,
    slots: tuple[int, ...],
    *terms: tuple[float, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, OptimizerState]:
    """One optimiser step on V_b (runs on a worker).

    The gradient is the sum, in the given order, of element ``slots[i]`` of
    ``terms[i]``: the ∂/∂V_b of each tile that touches block b (1 for its
    rows, 2 for its columns), taken from the tile results directly so that
    no task is spent picking them out.
    """
    device = compute_device(device_preference)
    v = vectors.to(device)
    gradient = torch.zeros_like(v)
    for slot, term in zip(slots, terms, strict=True):
        gradient += term[slot].to(device)
    new, new_state = optimizer_step(v, gradient, state, learning_rate, optimizer_name)
    return new.cpu(), new_state


def total_loss(*terms: tuple[float, torch.Tensor, torch.Tensor]) -> float:
    """Σ of the tiles' loss shares, in tile order."""
    return float(sum(term[0] for term in terms))


class CooccurrenceWeightedGradient(CooccurrenceTrainer):
    """Full-batch optimiser steps on V under the weighted loss; see the module docstring."""

    def __init__(self, inputs: TrainingInputs) -> None:
        super().__init__(inputs)
        s = self.settings
        self.tiles = load_resident_tiles(
            self._submit,
            self.cooccurrence,
            load_weighted_tile,
            s.weight_x_max,
            s.weight_power,
            s.log_target,
            s.device,
        )
        moments = self.client.gather(
            [self._submit(target_moments, tile, self._multiplicity(key)) for key, tile in self.tiles.items()]
        )
        # The loss at V = 0: what "relative_loss" is measured against.
        self.norm = max(sum(m[0] for m in moments), 1e-300)
        scale = objective.initial_scale(sum(m[1] for m in moments), sum(m[2] for m in moments), s.rank)
        # Adam's steps are in the parameters' units: relative to the fitted
        # scale, one learning rate suits counts and log counts alike.
        self.step_size = s.learning_rate * scale
        # Below the data's scale, like the squared-loss solver: the loss then
        # starts near its value at V = 0 instead of about twice it.
        self._start(inputs.initial, 0.3 * scale, with_states=True)
        self.updates_done = 0

    @staticmethod
    def _multiplicity(key: tuple[int, int]) -> int:
        return 1 if key[0] == key[1] else 2

    def _tile_terms(self) -> dict[tuple[int, int], Future]:
        return {
            (b, c): self._submit(
                tile_terms, tile, self.vectors[b], self.vectors[c], self._multiplicity((b, c))
            )
            for (b, c), tile in self.tiles.items()
        }

    def _loss(self, terms: dict[tuple[int, int], Future]) -> float:
        return self._submit(total_loss, *terms.values()).result()

    def run_epoch(self, epoch: int) -> list[Measurement]:
        """One step on every block; the loss it measures is the one before the step (epoch − 1)."""
        terms = self._tile_terms()
        slots: list[list[int]] = [[] for _ in range(self.grid.n_blocks)]
        parts: list[list[Future]] = [[] for _ in range(self.grid.n_blocks)]
        for (b, c), term in terms.items():
            slots[b].append(1)
            parts[b].append(term)
            slots[c].append(2)
            parts[c].append(term)
        s = self.settings
        assert self.states is not None
        updates = [
            self._submit(step_block, v, st, self.step_size, s.optimizer, s.device, tuple(slot), *part)
            for v, st, slot, part in zip(self.vectors, self.states, slots, parts, strict=True)
        ]
        self.vectors = [self._submit(pick, u, 0) for u in updates]
        self.states = [self._submit(pick, u, 1) for u in updates]
        self.updates_done = epoch
        return [self._measure(epoch - 1, self._loss(terms))]

    def finish(self) -> list[Measurement]:
        return [self._measure(self.updates_done, self._loss(self._tile_terms()))]
