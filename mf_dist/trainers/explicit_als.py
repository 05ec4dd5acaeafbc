"""Sharded ALS for explicit ratings with biases (weighted-λ, Zhou et al. 2008).

An epoch solves every user block with the items fixed, then every item
block with the users fixed: exactly (:func:`mf_dist.models.explicit.als_update_rows`,
``--als-method cholesky``, the default) or by a few conjugate-gradient steps
from the current rows (:func:`mf_dist.models.explicit.cg_update_rows`,
``--als-method cg``).
A block's solve task receives that block's entries (resident on its worker)
and the other side's factor blocks; its k × k systems are assembled and
solved in row chunks on the worker's device. The loss after the epoch is the
gradient solver's objective per rating, measured in the item solves.
"""

from __future__ import annotations

import math

from mf_dist.blocks import RowBlock
from mf_dist.models import explicit as objective
from mf_dist.runtime.cluster import compute_device
from mf_dist.settings import TrainSettings
from mf_dist.trainers.base import TrainingInputs, UserItemTrainer
from mf_dist.trainers.epoch_loop import Measurement
from mf_dist.trainers.ratings_sides import SideEntries, load_ratings_sides
from mf_dist.trainers.tasks import concatenate_bias, concatenate_vectors


def solve_side_block(
    entries: SideEntries,
    block: RowBlock,
    global_mean: float,
    settings: TrainSettings,
    *other_blocks: RowBlock,
) -> RowBlock:
    """The ALS rows of one block given every block of the other side (runs on a worker).

    Exact (batched Cholesky) or ``settings.cg_steps`` conjugate-gradient
    steps from the block's current rows, by ``settings.als_method``.
    """
    device = compute_device(settings.device)
    entry_tensors = (entries.rows.to(device), entries.cols.to(device), entries.values.to(device))
    other_vectors = concatenate_vectors(*other_blocks).to(device)
    other_bias = concatenate_bias(*other_blocks).to(device)
    if settings.als_method == "cholesky":
        vectors, bias = objective.als_update_rows(
            *entry_tensors,
            entries.n_rows,
            other_vectors,
            other_bias,
            global_mean,
            settings.regularization,
        )
    else:
        assert block.bias is not None
        vectors, bias = objective.cg_update_rows(
            *entry_tensors,
            block.vectors.to(device),
            block.bias.to(device),
            other_vectors,
            other_bias,
            global_mean,
            settings.regularization,
            settings.cg_steps,
        )
    return RowBlock(vectors=vectors.cpu(), bias=bias.cpu())


def side_objective(
    entries: SideEntries,
    block: RowBlock,
    global_mean: float,
    regularization: float,
    *other_blocks: RowBlock,
) -> tuple[float, float]:
    """(objective, squared error) summed over one block's entries (runs on a worker)."""
    assert block.bias is not None
    total, squared_error = objective.block_objective(
        entries.rows,
        entries.cols,
        entries.values,
        block.vectors,
        concatenate_vectors(*other_blocks),
        block.bias,
        concatenate_bias(*other_blocks),
        global_mean,
        regularization,
    )
    return float(total), float(squared_error)


class ExplicitALS(UserItemTrainer):
    """Explicit ratings by alternating exact block solves; see the module docstring."""

    has_bias = True
    initial_scale = 0.1

    def __init__(self, inputs: TrainingInputs) -> None:
        super().__init__(inputs)
        self.sides = load_ratings_sides(self.client, self.ingest, liked_only=False, resources=self.resources)

    def run_epoch(self, epoch: int) -> list[Measurement]:
        s = self.settings
        mean = self.ingest.global_mean
        self.users = [
            self._submit(solve_side_block, entries, block, mean, s, *self.items)
            for entries, block in zip(self.sides.user_blocks(), self.users, strict=True)
        ]
        self.items = [
            self._submit(solve_side_block, entries, block, mean, s, *self.users)
            for entries, block in zip(self.sides.item_blocks(), self.items, strict=True)
        ]
        sums = self.client.gather(
            [
                self._submit(side_objective, entries, block, mean, s.regularization, *self.users)
                for entries, block in zip(self.sides.item_blocks(), self.items, strict=True)
            ]
        )
        n = max(1, self.sides.n_entries)
        loss = sum(t[0] for t in sums) / n
        return [Measurement(epoch, loss, {"train_rmse": math.sqrt(sum(t[1] for t in sums) / n)})]

    def divergence_advice(self) -> str:
        return f"raise --regularization (now {self.settings.regularization}) or lower --rank"
