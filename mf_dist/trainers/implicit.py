"""Sharded implicit-feedback ALS and gradient training (Hu, Koren & Volinsky 2008).

Both solvers work on the liked entries only (ratings ≥ the like threshold, or
every entry of implicit input) plus the k × k Gram matrix of the other side,
summed over its blocks; the users × items matrix is never formed.

- ``als``: every user block, then every item block, is re-solved given the
  other side: by ``cg_steps`` conjugate-gradient steps from the current rows
  (Takács et al. 2011, the default) or exactly by Cholesky.
- ``gradient``: one full-batch optimiser step (Adam or Adagrad) per block and
  side, with the gradient of the same loss.

The loss after an epoch is the full Hu et al. objective (all pairs).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from distributed import Client, Future

from mf_dist.models import implicit as objective
from mf_dist.runtime.cluster import compute_device
from mf_dist.settings import TrainSettings
from mf_dist.solvers.gradient import RowBlock, optimizer_step
from mf_dist.storage.factor_files import FactorTable, block_seed
from mf_dist.storage.ingested import IngestResult
from mf_dist.trainers.epoch_loop import Measurement
from mf_dist.trainers.ratings_sides import (
    RowRange,
    SideEntries,
    concatenate_vectors,
    load_ratings_sides,
    random_row_block,
)

INITIAL_SCALE = 0.01


def als_block(
    entries: SideEntries,
    block: RowBlock,
    rows: RowRange,
    settings: TrainSettings,
    with_terms: bool,
    *others: RowBlock,
) -> ScoredRowBlock:
    """Re-solve rows ``[start, stop)`` of one block given the other side (runs on a worker).

    ``entries`` are those rows' entries, row 0 being ``start``. Returns the new
    rows (float32, CPU) with, when ``with_terms``, their liked loss terms
    Σ [c (1 − s)² − s²] at the new vectors (else 0.0): computing them here
    reuses the other side already fetched for the solve, instead of a second
    round of tasks that fetch it again. ``others`` are the other side's
    blocks in order; its Gram matrix is the sum of theirs (:func:`summarize_gram`).
    """
    device = compute_device(settings.device)
    start, stop = rows
    args = (
        entries.rows.to(device),
        entries.cols.to(device),
        entries.values.to(device),
    )
    other_vectors, other_gram = other_side(device, *others)
    if settings.als_method == "cholesky":
        vectors = objective.exact_update_rows(
            *args,
            entries.n_rows,
            other_vectors,
            other_gram,
            settings.alpha,
            settings.regularization,
        ).float()
        terms = _liked_terms(*args, vectors, other_vectors, settings.alpha) if with_terms else 0.0
    else:
        vectors, scores = objective.cg_update_rows(
            *args,
            block.vectors[start:stop].to(device),
            other_vectors,
            other_gram,
            settings.alpha,
            settings.regularization,
            settings.cg_steps,
        )
        # The solve scored every liked entry at the new rows already.
        terms = 0.0
        if with_terms:
            terms = float(objective.liked_terms_from_scores(scores, args[2], settings.alpha))
    return ScoredRowBlock(vectors=vectors.cpu(), liked_terms=terms, gram=vector_gram(vectors).cpu())


def gradient_block(
    entries: SideEntries,
    block: RowBlock,
    rows: RowRange,
    settings: TrainSettings,
    with_terms: bool,
    *others: RowBlock,
) -> ScoredRowBlock:
    """One optimiser step on one whole block's rows (runs on a worker); returns as :func:`als_block`.

    ``rows`` must be the whole block: the optimiser state is per block.
    """
    if rows != (0, block.n_rows):
        raise ValueError(f"gradient steps take whole blocks, not rows {rows} of {block.n_rows}")
    device = compute_device(settings.device)
    vectors = block.vectors.to(device)
    args = (entries.rows.to(device), entries.cols.to(device), entries.values.to(device))
    other_vectors, other_gram = other_side(device, *others)
    gradient = objective.row_gradient(
        *args,
        vectors,
        other_vectors,
        other_gram,
        settings.alpha,
        settings.regularization,
    )
    updated, state = optimizer_step(
        vectors, gradient, block.state, settings.learning_rate, settings.optimizer
    )
    terms = _liked_terms(*args, updated, other_vectors, settings.alpha) if with_terms else 0.0
    return ScoredRowBlock(
        vectors=updated.cpu(), state=state, liked_terms=terms, gram=vector_gram(updated).cpu()
    )


class _LastOtherSide:
    """The last :func:`other_side` of this worker process, kept while its blocks are the same objects."""

    lock = threading.Lock()
    blocks: tuple[RowBlock, ...] = ()
    device: torch.device | None = None
    vectors: torch.Tensor | None = None
    gram: torch.Tensor | None = None


def other_side(device: torch.device, *others: RowBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """The other side's vectors (m × k, float32) and Gram Σ VᵀV (k × k, float64) on ``device``: read-only.

    Every task of a side takes the same blocks of the other side, and a worker
    runs many of those tasks in an epoch, so the worker keeps the last result
    and hands it out again while the blocks are the very objects it was made
    from (Dask gives every task on a worker the same object for a key). At
    ML-20M's shape concatenating the user side was 35 MB copied per item task.
    """
    last = _LastOtherSide
    with last.lock:
        if (
            last.device == device
            and len(last.blocks) == len(others)
            and all(kept is given for kept, given in zip(last.blocks, others, strict=True))
        ):
            assert last.vectors is not None and last.gram is not None
            return last.vectors, last.gram
    vectors = concatenate_vectors(*others).to(device)
    gram = summarize_gram(*others).to(device)
    with last.lock:
        last.blocks, last.device, last.vectors, last.gram = others, device, vectors, gram
    return vectors, gram


def _liked_terms(
    rows: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    vectors: torch.Tensor,
    other_vectors: torch.Tensor,
    alpha: float,
) -> float:
    return float(objective.liked_loss_terms(rows, cols, values, vectors, other_vectors, alpha))


@dataclass
class ScoredRowBlock(RowBlock):
    """A row block with what the epoch needs of it besides its vectors.

    ``liked_terms``: Σ [c (1 − s)² − s²] of its rows at its vectors (0.0 where
    not computed); ``gram``: VᵀV of its vectors (k × k, float64), or None.
    Computed by the task that made the block, in parallel across blocks, so
    that the next side's tasks only add k × k matrices instead of waiting for
    a Gram task; carried in the block, they spare a task per block that would
    only unpack a tuple (a few milliseconds of scheduler time each).
    """

    liked_terms: float = 0.0
    gram: torch.Tensor | None = None


def vector_gram(vectors: torch.Tensor) -> torch.Tensor:
    """VᵀV in float64 (k × k) of ``vectors`` (n × k), so that sums over blocks stay exact."""
    wide = vectors.double()
    return wide.T @ wide


def join_rows(*pieces: ScoredRowBlock) -> ScoredRowBlock:
    """One block from its row pieces in row order, terms and Grams summed in order (runs on a worker)."""
    return ScoredRowBlock(
        vectors=torch.cat([piece.vectors for piece in pieces]),
        liked_terms=sum_terms(*pieces),
        gram=summarize_gram(*pieces),
    )


def summarize_gram(*blocks: RowBlock) -> torch.Tensor:
    """Σ VᵀV over ``blocks`` in order (k × k float64): each block's own Gram where it carries one."""
    total = None
    for block in blocks:
        own = getattr(block, "gram", None)
        own = vector_gram(block.vectors) if own is None else own
        total = own.clone() if total is None else total.add_(own)
    assert total is not None
    return total


def sum_terms(*blocks: ScoredRowBlock) -> float:
    """Σ of the blocks' liked loss terms, in block order (deterministic)."""
    return float(sum(block.liked_terms for block in blocks))


class ImplicitModel:
    """Implicit feedback on the liked matrix; ``update`` is the ALS or the gradient block step."""

    def __init__(
        self,
        client: Client,
        ingest: IngestResult,
        settings: TrainSettings,
        resources: dict[str, float] | None,
        initial: dict[str, list[Future]] | None = None,
    ) -> None:
        self.client = client
        self.ingest = ingest
        self.settings = settings
        self.resources = resources
        self.update: Callable[..., ScoredRowBlock] = als_block if settings.solver == "als" else gradient_block
        # The starting factors first: Dask runs ready tasks in the order they
        # were submitted, and the first user solves need every item block.
        initial = initial or {}
        self.users = initial.get("users") or self._random_blocks(ingest.user_grid, 0)
        self.users_ahead: list[Future] | None = None
        self.items = initial.get("items") or self._random_blocks(ingest.item_grid, 1)
        # ALS solves every row on its own, so crowded blocks are cut into row
        # pieces that run as separate tasks; the optimiser state of the
        # gradient solvers is per block, so they keep whole blocks.
        self.sides = load_ratings_sides(
            client, ingest, liked_only=True, resources=resources, split=settings.solver == "als"
        )
        self.user_pieces = [
            list(zip(entries, ranges, strict=True))
            for entries, ranges in zip(self.sides.users, self.sides.user_ranges, strict=True)
        ]
        self.item_pieces = [
            list(zip(entries, ranges, strict=True))
            for entries, ranges in zip(self.sides.items, self.sides.item_ranges, strict=True)
        ]

    def _submit(self, function: object, *args: object) -> Future:
        return self.client.submit(function, *args, resources=self.resources, pure=False)

    def _random_blocks(self, grid: object, side: int) -> list[Future]:
        return [
            self._submit(
                random_row_block,
                stop - start,
                self.settings.rank,
                INITIAL_SCALE,
                block_seed(self.settings.seed, 0, side, block),
                False,
            )
            for block, start, stop in grid  # type: ignore[attr-defined]
        ]

    def _update_side(
        self,
        pieces: list[list[tuple[Future, RowRange]]],
        blocks: list[Future],
        others: list[Future],
        with_terms: bool,
    ) -> list[Future]:
        """Submit the update of every piece of every block: the new blocks (:class:`ScoredRowBlock`).

        Every task takes the other side's blocks themselves, not one task's
        concatenation of them: a single large input would draw every task to
        the worker that made it, leaving the others idle.
        """
        updated = []
        for block_pieces, block in zip(pieces, blocks, strict=True):
            results = [
                self._submit(self.update, entries, block, rows, self.settings, with_terms, *others)
                for entries, rows in block_pieces
            ]
            updated.append(results[0] if len(results) == 1 else self._submit(join_rows, *results))
        return updated

    def run_epoch(self, epoch: int) -> list[Measurement]:
        self.users = self.users_ahead or self._update_side(self.user_pieces, self.users, self.items, False)
        self.users_ahead = None
        # The item tasks also return the liked loss terms and Gram matrices at the new factors.
        self.items = self._update_side(self.item_pieces, self.items, self.users, True)
        summaries = [
            self._submit(sum_terms, *self.items),
            self._submit(summarize_gram, *self.users),
            self._submit(summarize_gram, *self.items),
        ]
        if epoch < self.settings.epochs:
            # The next epoch's user side needs only these items: submitted now
            # (after the summaries, which Dask then runs first), it runs while
            # this epoch's loss is gathered and its checkpoint written, instead
            # of the workers idling through that round trip. When the loop stops
            # early these futures are dropped unused: every update is a new
            # block, so this epoch's factors stay as they are.
            self.users_ahead = self._update_side(self.user_pieces, self.users, self.items, False)
        terms, user_gram, item_gram = self.client.gather(summaries)
        squared_norms = torch.trace(user_gram) + torch.trace(item_gram)
        loss = objective.total_loss(
            user_gram,
            item_gram,
            torch.tensor(terms, dtype=torch.float64),
            squared_norms,
            self.settings.regularization,
        )
        return [
            Measurement(epoch, float(loss), {"loss_per_like": float(loss) / max(1, self.sides.n_entries)})
        ]

    def finish(self) -> list[Measurement]:
        return []

    def factor_blocks(self) -> dict[str, tuple[FactorTable, list[Future]]]:
        return {
            "users": (self._layout("users", self.ingest.n_users), self.users),
            "items": (self._layout("items", self.ingest.n_items), self.items),
        }

    def _layout(self, name: str, n_rows: int) -> FactorTable:
        return FactorTable(
            name=name,
            directory="",
            n_rows=n_rows,
            block_size=self.ingest.block_size,
            rank=self.settings.rank,
            has_bias=False,
        )

    def divergence_advice(self) -> str:
        if self.settings.solver == "gradient":
            return f"lower --learning-rate (now {self.settings.learning_rate})"
        return f"raise --regularization (now {self.settings.regularization}) or lower --alpha"
