"""Sharded implicit-feedback ALS and gradient training (Hu, Koren & Volinsky 2008).

Both solvers work on the liked entries only (ratings ≥ the like threshold, or
every entry of implicit input) plus the k × k Gram matrix of the other side,
summed over its blocks; the users × items matrix is never formed.

- :class:`ImplicitALS`: every user block, then every item block, is
  re-solved given the other side: by ``cg_steps`` conjugate-gradient steps
  from the current rows (Takács et al. 2011, the default) or exactly by
  Cholesky.
- :class:`ImplicitGradient`: one full-batch optimiser step (Adam or
  Adagrad) per block and side, with the gradient of the same loss.

The loss after an epoch is the full Hu et al. objective (all pairs).

Both trainers live in this one module: they share everything but the block
step (:func:`als_block` or :func:`gradient_block`) and whether crowded
blocks are cut into row pieces — the liked sides, the cache of the other
side on a worker, the piece updates, the loss and the look-ahead of the next
epoch's user side (:class:`ImplicitTrainer`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from distributed import Future

from mf_dist.blocks import RowBlock
from mf_dist.models import implicit as objective
from mf_dist.runtime.cluster import compute_device
from mf_dist.settings import TrainSettings
from mf_dist.solvers.gradient import optimizer_step
from mf_dist.solvers.rows import gram
from mf_dist.trainers.base import TrainingInputs, UserItemTrainer
from mf_dist.trainers.epoch_loop import Measurement
from mf_dist.trainers.ratings_sides import RowRange, SideEntries, load_ratings_sides
from mf_dist.trainers.tasks import concatenate_vectors


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
    args = entry_arguments(entries, settings, device)
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
    return ScoredRowBlock(vectors=vectors.cpu(), liked_terms=terms, gram=gram(vectors).cpu())


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
    args = entry_arguments(entries, settings, device)
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
    return ScoredRowBlock(vectors=updated.cpu(), state=state, liked_terms=terms, gram=gram(updated).cpu())


def entry_arguments(
    entries: SideEntries, settings: TrainSettings, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, confidence weights w) of the entries on ``device``, w by the run's ``confidence``.

    The one place a block step turns the liked values r into w = (c − 1)/α
    (:func:`mf_dist.models.implicit.confidence_weights`): the solve, the
    gradient and the loss terms all take these, so they agree on c.
    """
    weights = objective.confidence_weights(entries.values, settings.confidence, settings.confidence_epsilon)
    return entries.rows.to(device), entries.cols.to(device), weights.to(device)


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
    total = summarize_gram(*others).to(device)
    with last.lock:
        last.blocks, last.device, last.vectors, last.gram = others, device, vectors, total
    return vectors, total


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
        own = gram(block.vectors) if own is None else own
        total = own.clone() if total is None else total.add_(own)
    assert total is not None
    return total


def sum_terms(*blocks: ScoredRowBlock) -> float:
    """Σ of the blocks' liked loss terms, in block order (deterministic)."""
    return float(sum(block.liked_terms for block in blocks))


class ImplicitTrainer(UserItemTrainer):
    """Implicit feedback on the liked matrix; a subclass names the block step and whether blocks are cut."""

    initial_scale = 0.01
    update: ClassVar[Callable[..., ScoredRowBlock]]
    """The block step, run on a worker: :func:`als_block` or :func:`gradient_block` (their signature)."""
    split: ClassVar[bool]
    """Whether crowded blocks are cut into row pieces solved as separate tasks."""

    def __init__(self, inputs: TrainingInputs) -> None:
        super().__init__(inputs)
        self.users_ahead: list[Future] | None = None
        self.sides = load_ratings_sides(
            self.client, self.ingest, liked_only=True, resources=self.resources, split=self.split
        )
        self.user_pieces = [
            list(zip(entries, ranges, strict=True))
            for entries, ranges in zip(self.sides.users, self.sides.user_ranges, strict=True)
        ]
        self.item_pieces = [
            list(zip(entries, ranges, strict=True))
            for entries, ranges in zip(self.sides.items, self.sides.item_ranges, strict=True)
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


class ImplicitALS(ImplicitTrainer):
    """Implicit feedback by ALS: every row is solved on its own, so crowded blocks are cut into row pieces."""

    update = staticmethod(als_block)
    split = True

    def divergence_advice(self) -> str:
        return f"raise --regularization (now {self.settings.regularization}) or lower --alpha"


class ImplicitGradient(ImplicitTrainer):
    """Implicit feedback by full-batch optimiser steps; optimiser state is per block, so blocks stay whole."""

    update = staticmethod(gradient_block)
    split = False
