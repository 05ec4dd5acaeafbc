"""The worked example's trainer: full-batch gradient steps on :mod:`.objective`, in one task per epoch.

A toy: one task holds every rating and both tables, which a real trainer
never does (it works block by block, see mf_dist/trainers/). It shows what
a trainer on :class:`~mf_dist.trainers.base.UserItemTrainer` must write:
where its data comes from and what one epoch does.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pyarrow.parquet as pq
import torch
from distributed import Future

from mf_dist.blocks import RowBlock
from mf_dist.trainers.base import TrainingInputs, UserItemTrainer
from mf_dist.trainers.epoch_loop import Measurement
from mf_dist.trainers.tasks import pick
from tests.support.toy_model import objective


def read_ratings(paths: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(user indices, item indices, ratings) of every ingested ratings block."""
    tables = [pq.read_table(path) for path in paths]
    columns = [np.concatenate([table[name].to_numpy() for table in tables]) for name in ("user", "item")]
    ratings = np.concatenate([table["rating"].to_numpy() for table in tables])
    return (*(torch.from_numpy(column.astype(np.int64)) for column in columns), torch.from_numpy(ratings))


def gradient_step(
    ratings: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    users: list[RowBlock],
    items: list[RowBlock],
    learning_rate: float,
    regularization: float,
) -> tuple[float, list[RowBlock], list[RowBlock]]:
    """One step on both tables; returns the loss before it and the new blocks, split as given."""
    u = torch.cat([block.vectors for block in users])
    v = torch.cat([block.vectors for block in items])
    loss, grad_u, grad_v = objective.loss_and_gradients(u, v, *ratings, regularization)
    u, v = u - learning_rate * grad_u, v - learning_rate * grad_v
    split = lambda table, blocks: [  # noqa: E731
        RowBlock(part.clone()) for part in torch.split(table, [b.n_rows for b in blocks])
    ]
    return loss, split(u, users), split(v, items)


class ToyGradient(UserItemTrainer):
    """Full-batch gradient descent on the toy objective."""

    initial_scale: ClassVar[float] = 0.3

    def __init__(self, inputs: TrainingInputs) -> None:
        super().__init__(inputs)
        self.epoch = 0
        paths = [str(self.ingest.ratings_path(block)) for block, _, _ in self.ingest.user_grid]
        self.ratings: Future = self._submit(read_ratings, paths)

    def run_epoch(self, epoch: int) -> list[Measurement]:
        """One step; the loss it measures is that of the factors before it, after ``epoch - 1`` updates."""
        self.epoch = epoch
        step = self._submit(
            gradient_step,
            self.ratings,
            self.users,
            self.items,
            self.settings.learning_rate,
            self.settings.regularization,
        )
        users, items = self._submit(pick, step, 1), self._submit(pick, step, 2)
        self.users = [self._submit(pick, users, b) for b in range(len(self.users))]
        self.items = [self._submit(pick, items, b) for b in range(len(self.items))]
        return [Measurement(epoch - 1, float(self._submit(pick, step, 0).result()))]

    def finish(self) -> list[Measurement]:
        """The loss of the final factors (a step of size 0 measures it)."""
        step = self._submit(
            gradient_step, self.ratings, self.users, self.items, 0.0, self.settings.regularization
        )
        return [Measurement(self.epoch, float(self._submit(pick, step, 0).result()))]
