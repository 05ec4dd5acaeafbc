"""Sharded alternating least squares for the co-occurrence embedding (squared loss, all pairs).

An epoch visits the row blocks of V in turn (block Gauss–Seidel). For block b:

1. G = Σ_c V_cᵀV_c from the per-block Grams, the blocks before b already new;
2. E_b = Σ_{c≠b} X₀_bc V_c, one product per stored tile of block row b,
   computed where the tile lives;
3. on the worker holding the diagonal tile X₀_bb: every row's normal
   equations (G − v_i v_iᵀ) v_i = (X₀V)_i solved at once, then the exact
   line search along the step (:func:`mf_dist.models.cooccurrence.als_block_update`),
   which returns the new V_b, its Gram and the exact change of the loss.

Each block step lowers (never raises) the loss with all other rows fixed, so
the loss falls monotonically. It is tracked exactly: one full evaluation
when training starts (or resumes), then the sum of the block changes. ALS
works in float64 (the systems G − v_i v_iᵀ cancel when one item dominates G);
the stored factors are float32 like every other table, and the reported
loss is that of the stored values.

Per epoch every off-diagonal tile is multiplied once in each direction, as
in the gradient solver, and each diagonal tile three times (X₀_bb V_b, X₀_bb D
for the line search, X₀_bb V_b' for the exact change); the tile products of a
block run in parallel where the tiles live, the block solves in sequence.
"""

from __future__ import annotations

import torch
from distributed import Future

from mf_dist.errors import ConfigError
from mf_dist.models import cooccurrence as objective
from mf_dist.runtime.cluster import compute_device
from mf_dist.solvers.rows import gram
from mf_dist.trainers.base import CooccurrenceTrainer, TrainingInputs
from mf_dist.trainers.cooccurrence_gradient import start_scale
from mf_dist.trainers.cooccurrence_tiles import (
    ResidentTile,
    load_resident_tiles,
    load_tile_tensors,
    tile_product,
    tile_product_parts,
)
from mf_dist.trainers.epoch_loop import Measurement
from mf_dist.trainers.tasks import pick, sum_tensors

# ρ = 1e-6 · tr(G)/k: far below an informative system's eigenvalues (it moves
# the rows' least-squares fits by a relative 1e-6 to 1e-5 in the tests), yet a
# row whose other rows span fewer than k directions gets a finite answer
# instead of a huge one. The ridge only shapes the step's direction: the line
# search and the reported loss use the unregularised objective.
RELATIVE_RIDGE = 1e-6


def block_loss_terms(vectors: torch.Tensor, *cross_parts: torch.Tensor) -> tuple[float, float]:
    """The block's (Σ‖v_i‖⁴, Σ v_iᵀ(X₀V)_i), (X₀V)_b summed here from its parts."""
    cross = sum_tensors(*cross_parts) if cross_parts else torch.zeros(vectors.shape, dtype=torch.float64)
    fourth, inner = objective.block_loss_terms(vectors, cross)
    return float(fourth), float(inner)


def solve_block(
    diagonal_tile: ResidentTile | None,
    vectors: torch.Tensor,
    relative_ridge: float,
    device_preference: str,
    grams: list[torch.Tensor],
    *external_parts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """One block step on a worker: (new V_b float32, its Gram, loss change, line-search step).

    ``grams`` holds every block's VᵀV (summed here into G, in block order),
    ``external_parts`` the products X₀_bc V_c, c ≠ b, that sum to E_b.
    """
    device = compute_device(device_preference)
    tile = None if diagonal_tile is None else diagonal_tile.forward
    external = (
        sum_tensors(*external_parts) if external_parts else torch.zeros(vectors.shape, dtype=torch.float64)
    )
    new, change, step = objective.als_block_update(
        vectors.to(device),
        sum_tensors(*grams).to(device),
        external.to(device),
        None if tile is None else tile.to(device),
        relative_ridge,
    )
    new = new.cpu()
    return new, gram(new), change, step


def step_summaries(*steps: tuple) -> list[tuple[float, float]]:
    """(loss change, line-search step) of each block step, without their factor blocks."""
    return [(step[2], step[3]) for step in steps]


class CooccurrenceALS(CooccurrenceTrainer):
    """Block Gauss–Seidel ALS on V; see the module docstring."""

    def __init__(self, inputs: TrainingInputs) -> None:
        if inputs.settings.loss != "squared":
            raise ConfigError(
                f"the co-occurrence model's {inputs.settings.loss!r} loss has only the gradient solver; "
                "use --solver gradient, or --loss squared for ALS"
            )
        super().__init__(inputs)
        cooccurrence, settings = self.cooccurrence, self.settings
        self.norm = max(cooccurrence.offdiagonal_sum_of_squares, 1e-300)
        self.tiles = load_resident_tiles(self._submit, cooccurrence, load_tile_tensors, settings.device)
        # The gradient solver's start (same scale and seeds), so that the two
        # solvers' curves begin at the same loss and can be compared.
        self._start(inputs.initial, start_scale(cooccurrence, settings.rank), with_states=False)
        self.loss: float | None = None

    def _full_loss(self) -> float:
        """Σ_{i≠j}(v_iᵀv_j − X_ij)² at the current V, in float64."""
        total_gram = self._submit(sum_tensors, *[self._submit(gram, v) for v in self.vectors])
        parts = tile_product_parts(self._submit, self.tiles, self.vectors, torch.float64)
        terms = self.client.gather(
            [self._submit(block_loss_terms, v, *p) for v, p in zip(self.vectors, parts, strict=True)]
        )
        total = objective.total_loss(
            total_gram.result(),
            torch.tensor(sum(t[0] for t in terms), dtype=torch.float64),
            torch.tensor(sum(t[1] for t in terms), dtype=torch.float64),
            self.cooccurrence.offdiagonal_sum_of_squares,
        )
        return float(total)

    def _external_parts(self, b: int) -> list[Future]:
        """The products X₀_bc V_c, c ≠ b, in block order: they sum to E_b."""
        parts = []
        for c in range(self.grid.n_blocks):
            key = (min(b, c), max(b, c))
            if c == b or key not in self.tiles:
                continue
            # Tile (c, b) with c < b is stored; X₀_bc is its transpose.
            parts.append(self._submit(tile_product, self.tiles[key], self.vectors[c], c < b, torch.float64))
        return parts

    def run_epoch(self, epoch: int) -> list[Measurement]:
        measurements = []
        if self.loss is None:
            self.loss = self._full_loss()
            # A resumed run already has this point in its history.
            if epoch == 1:
                measurements.append(self._measure(0, self.loss))
        grams = [self._submit(gram, v) for v in self.vectors]
        steps = []
        for b in range(self.grid.n_blocks):
            step = self._submit(
                solve_block,
                self.tiles.get((b, b)),
                self.vectors[b],
                RELATIVE_RIDGE,
                self.settings.device,
                list(grams),
                *self._external_parts(b),
            )
            self.vectors[b] = self._submit(pick, step, 0)
            grams[b] = self._submit(pick, step, 1)
            steps.append(step)
        summaries = self._submit(step_summaries, *steps).result()
        self.loss += sum(change for change, _ in summaries)
        mean_step = sum(t for _, t in summaries) / max(1, len(summaries))
        return [*measurements, self._measure(epoch, self.loss, {"mean_line_search_step": mean_step})]

    def divergence_advice(self) -> str:
        return f"the row systems are too ill-conditioned; lower --rank (now {self.settings.rank})"
