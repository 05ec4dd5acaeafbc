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

from collections.abc import Callable

import torch
from distributed import Client, Future

from mf_dist.errors import ConfigError
from mf_dist.models import cooccurrence as objective
from mf_dist.runtime.cluster import compute_device
from mf_dist.settings import TrainSettings
from mf_dist.storage.factor_files import FactorTable, block_seed
from mf_dist.storage.tiles import CooccurrenceResult
from mf_dist.trainers.cooccurrence import (
    ResidentTile,
    as_row_block,
    block_gram,
    block_vectors,
    initial_block,
    load_tile_tensors,
    pick,
    sum_tensors,
)
from mf_dist.trainers.epoch_loop import Measurement

# ρ = 1e-6 · tr(G)/k: far below an informative system's eigenvalues (it moves
# the rows' least-squares fits by a relative 1e-6 to 1e-5 in the tests), yet a
# row whose other rows span fewer than k directions gets a finite answer
# instead of a huge one. The ridge only shapes the step's direction: the line
# search and the reported loss use the unregularised objective.
RELATIVE_RIDGE = 1e-6

TileKey = tuple[int, int]


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
    client: Client,
    tiles: dict[TileKey, Future],
    vectors: list[Future],
    resources: dict[str, float] | None,
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
        parts[b].append(client.submit(tile_product, tile, vectors[c], False, dtype, resources=resources))
        if b != c:
            parts[c].append(client.submit(tile_product, tile, vectors[b], True, dtype, resources=resources))
    return parts


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
    return new, objective.gram(new), change, step


def step_summaries(*steps: tuple) -> list[tuple[float, float]]:
    """(loss change, line-search step) of each block step, without their factor blocks."""
    return [(step[2], step[3]) for step in steps]


class CooccurrenceALS:
    """Block Gauss–Seidel ALS on V; see the module docstring."""

    def __init__(
        self,
        client: Client,
        cooccurrence: CooccurrenceResult,
        settings: TrainSettings,
        resources: dict[str, float] | None,
        initial: dict[str, list[Future]] | None = None,
    ) -> None:
        if settings.loss != "squared":
            raise ConfigError(
                f"the co-occurrence model's {settings.loss!r} loss has only the gradient solver; "
                "use --solver gradient, or --loss squared for ALS"
            )
        self.client = client
        self.cooccurrence = cooccurrence
        self.settings = settings
        self.grid = cooccurrence.item_grid
        self.resources = resources
        self.norm = max(cooccurrence.offdiagonal_sum_of_squares, 1e-300)
        self.tiles: dict[TileKey, Future] = {
            (info.row_block, info.col_block): self._submit(
                load_tile_tensors,
                info,
                (self.grid.size(info.row_block), self.grid.size(info.col_block)),
                settings.device,
            )
            for info in cooccurrence.tiles
        }
        if initial and "items" in initial:
            self.vectors = [self._submit(block_vectors, b) for b in initial["items"]]
        else:
            # The gradient solver's start (same scale and seeds), so that the two
            # solvers' curves begin at the same loss and can be compared.
            scale = 0.3 * objective.initial_scale(
                cooccurrence.offdiagonal_sum_of_squares, cooccurrence.n_items, settings.rank
            )
            self.vectors = [
                self._submit(
                    initial_block, stop - start, settings.rank, scale, block_seed(settings.seed, 0, b)
                )
                for b, start, stop in self.grid
            ]
        self.loss: float | None = None

    def _submit(self, function: Callable, *args: object) -> Future:
        return self.client.submit(function, *args, resources=self.resources, pure=False)

    def _full_loss(self) -> float:
        """Σ_{i≠j}(v_iᵀv_j − X_ij)² at the current V, in float64."""
        gram = self._submit(sum_tensors, *[self._submit(block_gram, v) for v in self.vectors])
        parts = tile_product_parts(self.client, self.tiles, self.vectors, self.resources, torch.float64)
        terms = self.client.gather(
            [self._submit(block_loss_terms, v, *p) for v, p in zip(self.vectors, parts, strict=True)]
        )
        total = objective.total_loss(
            gram.result(),
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

    def _measure(self, epoch: int, extra: dict[str, float] | None = None) -> Measurement:
        assert self.loss is not None
        return Measurement(epoch, self.loss, {"relative_loss": self.loss / self.norm, **(extra or {})})

    def run_epoch(self, epoch: int) -> list[Measurement]:
        measurements = []
        if self.loss is None:
            self.loss = self._full_loss()
            # A resumed run already has this point in its history.
            if epoch == 1:
                measurements.append(self._measure(0))
        grams = [self._submit(block_gram, v) for v in self.vectors]
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
        return [*measurements, self._measure(epoch, {"mean_line_search_step": mean_step})]

    def finish(self) -> list[Measurement]:
        return []

    def factor_blocks(self) -> dict[str, tuple[FactorTable, list[Future]]]:
        layout = FactorTable(
            name="items",
            directory="",
            n_rows=self.grid.n_rows,
            block_size=self.grid.block_size,
            rank=self.settings.rank,
            has_bias=False,
        )
        return {"items": (layout, [self._submit(as_row_block, v, None) for v in self.vectors])}

    def divergence_advice(self) -> str:
        return f"the row systems are too ill-conditioned; lower --rank (now {self.settings.rank})"
