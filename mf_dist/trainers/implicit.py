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

from collections.abc import Callable

import torch
from distributed import Client, Future

from mf_dist.cluster import compute_device
from mf_dist.config import TrainSettings
from mf_dist.factor_files import FactorTable, block_seed
from mf_dist.ingest import IngestResult
from mf_dist.models import implicit as objective
from mf_dist.solvers.gradient import RowBlock, optimizer_step
from mf_dist.trainers.epoch_loop import Measurement
from mf_dist.trainers.ratings_sides import (
    SideEntries,
    block_gram,
    concatenate_vectors,
    load_ratings_sides,
    random_row_block,
    sum_tensors,
)

INITIAL_SCALE = 0.01


def als_block(
    entries: SideEntries,
    block: RowBlock,
    other_gram: torch.Tensor,
    settings: TrainSettings,
    *others: RowBlock,
) -> RowBlock:
    """Re-solve one block's rows given the other side (runs on a worker)."""
    device = compute_device(settings.device)
    args = (
        entries.rows.to(device),
        entries.cols.to(device),
        entries.values.to(device),
    )
    other_vectors = concatenate_vectors(*others).to(device)
    if settings.als_method == "cholesky":
        vectors = objective.exact_update_rows(
            *args,
            entries.n_rows,
            other_vectors,
            other_gram.to(device),
            settings.alpha,
            settings.regularization,
        )
    else:
        vectors = objective.cg_update_rows(
            *args,
            block.vectors.to(device),
            other_vectors,
            other_gram.to(device),
            settings.alpha,
            settings.regularization,
            settings.cg_steps,
        )
    return RowBlock(vectors=vectors.float().cpu())


def gradient_block(
    entries: SideEntries,
    block: RowBlock,
    other_gram: torch.Tensor,
    settings: TrainSettings,
    *others: RowBlock,
) -> RowBlock:
    """One optimiser step on one block's rows (runs on a worker)."""
    device = compute_device(settings.device)
    vectors = block.vectors.to(device)
    gradient = objective.row_gradient(
        entries.rows.to(device),
        entries.cols.to(device),
        entries.values.to(device),
        vectors,
        concatenate_vectors(*others).to(device),
        other_gram.to(device),
        settings.alpha,
        settings.regularization,
    )
    updated, state = optimizer_step(
        vectors, gradient, block.state, settings.learning_rate, settings.optimizer
    )
    return RowBlock(vectors=updated.cpu(), state=state)


def liked_terms(entries: SideEntries, block: RowBlock, alpha: float, *others: RowBlock) -> float:
    return float(
        objective.liked_loss_terms(
            entries.rows, entries.cols, entries.values, block.vectors, concatenate_vectors(*others), alpha
        )
    )


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
        self.update: Callable[..., RowBlock] = als_block if settings.solver == "als" else gradient_block
        self.sides = load_ratings_sides(client, ingest, liked_only=True, resources=resources)
        initial = initial or {}
        self.users = initial.get("users") or self._random_blocks(ingest.user_grid, 0)
        self.items = initial.get("items") or self._random_blocks(ingest.item_grid, 1)

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

    def _gram(self, blocks: list[Future]) -> Future:
        return self.client.submit(sum_tensors, *[self._submit(block_gram, b) for b in blocks], pure=False)

    def run_epoch(self, epoch: int) -> list[Measurement]:
        item_gram = self._gram(self.items)
        self.users = [
            self._submit(self.update, entries, block, item_gram, self.settings, *self.items)
            for entries, block in zip(self.sides.users, self.users, strict=True)
        ]
        user_gram = self._gram(self.users)
        self.items = [
            self._submit(self.update, entries, block, user_gram, self.settings, *self.users)
            for entries, block in zip(self.sides.items, self.items, strict=True)
        ]
        item_gram = self._gram(self.items)
        terms = self.client.gather(
            [
                self._submit(liked_terms, entries, block, self.settings.alpha, *self.users)
                for entries, block in zip(self.sides.items, self.items, strict=True)
            ]
        )
        user_gram_value, item_gram_value = self.client.gather([user_gram, item_gram])
        squared_norms = torch.trace(user_gram_value) + torch.trace(item_gram_value)
        loss = objective.total_loss(
            user_gram_value,
            item_gram_value,
            torch.tensor(sum(terms), dtype=torch.float64),
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
