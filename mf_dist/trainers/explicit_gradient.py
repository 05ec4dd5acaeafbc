"""Sharded trainer for explicit ratings: mini-batch SparseAdam in the DSGD schedule.

Ratings block (p, q) — user block p × item block q — is loaded once onto a
worker and stays there. Each epoch visits the strata of
:func:`mf_dist.blocks.dsgd_strata`: the blocks of a stratum share no user or
item block, so their updates run at once on different workers and touch
disjoint rows of U and V (Gemulla et al., KDD 2011). The factor blocks
(rows × k, with biases and optimiser state) travel to the ratings blocks.

Every task's randomness comes from (seed, epoch, p, q), so for a given seed
and block size the result does not depend on which worker runs what.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
from distributed import Future

from mf_dist.blocks import BlockGrid, RowBlock, dsgd_strata
from mf_dist.models import explicit as objective
from mf_dist.runtime.cluster import compute_device
from mf_dist.solvers.gradient import sparse_adam_pass
from mf_dist.storage.factor_files import block_seed
from mf_dist.storage.store import read_table
from mf_dist.trainers.base import TrainingInputs, UserItemTrainer
from mf_dist.trainers.epoch_loop import Measurement
from mf_dist.trainers.tasks import pick

logger = logging.getLogger(__name__)

RatingsBlock = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def load_ratings_blocks(path: str, user_start: int, item_grid: BlockGrid) -> list[RatingsBlock]:
    """One user block's ratings cut by item block: (user row, item row, rating) per block."""
    table = read_table(path)
    users = torch.from_numpy(table["user"].to_numpy().astype("int64")) - user_start
    items = torch.from_numpy(table["item"].to_numpy().astype("int64"))
    # Arrow's buffer is read-only, and torch warns on every run about a tensor over one.
    ratings = torch.from_numpy(table["rating"].to_numpy().copy())
    blocks = []
    for _, start, stop in item_grid:
        inside = (items >= start) & (items < stop)
        blocks.append((users[inside], items[inside] - start, ratings[inside]))
    return blocks


def ratings_count(block: RatingsBlock) -> int:
    return len(block[2])


def train_ratings_block(
    ratings: RatingsBlock,
    users: RowBlock,
    items: RowBlock,
    *,
    global_mean: float,
    regularization: float,
    learning_rate: float,
    optimizer_name: str,
    batch_size: int,
    seed: int,
    device_preference: str,
) -> tuple[RowBlock, RowBlock, tuple[float, float]]:
    """One SparseAdam pass over ratings block (p, q); returns U_p, V_q and (objective, SSE) sums."""
    rows, cols, values = ratings
    batch_objective = functools.partial(
        objective.batch_objective, global_mean=global_mean, regularization=regularization
    )
    new_users, new_items, total, squared_error = sparse_adam_pass(
        users,
        items,
        rows,
        cols,
        values,
        batch_objective,
        learning_rate=learning_rate,
        optimizer_name=optimizer_name,
        batch_size=batch_size,
        generator=torch.Generator().manual_seed(seed),
        device=compute_device(device_preference),
    )
    return new_users, new_items, (total, squared_error)


class ExplicitGradient(UserItemTrainer):
    """Explicit ratings by mini-batch sparse Adam/Adagrad in DSGD strata (module docstring)."""

    has_bias = True
    initial_scale = 0.1

    def __init__(self, inputs: TrainingInputs) -> None:
        super().__init__(inputs)
        user_grid, item_grid = self.ingest.user_grid, self.ingest.item_grid
        per_user_block = [
            self._submit(load_ratings_blocks, str(self.ingest.ratings_path(p)), start, item_grid)
            for p, start, _ in user_grid
        ]
        self.ratings = {
            (p, q): self._submit(pick, per_user_block[p], q)
            for p in range(user_grid.n_blocks)
            for q in range(item_grid.n_blocks)
        }
        counts = self.client.gather(
            [self._submit(ratings_count, block, anywhere=True) for block in self.ratings.values()]
        )
        self.sizes = dict(zip(self.ratings, counts, strict=True))
        self.strata = dsgd_strata(user_grid.n_blocks, item_grid.n_blocks)

    def run_epoch(self, epoch: int) -> list[Measurement]:
        """One pass over every block in DSGD strata; the loss is summed over batches before their steps."""
        s = self.settings
        sums: list[Future] = []
        for stratum in self.strata:
            for p, q in stratum:
                if self.sizes[p, q] == 0:
                    continue
                result = self._submit(
                    train_ratings_block,
                    self.ratings[p, q],
                    self.users[p],
                    self.items[q],
                    global_mean=self.ingest.global_mean,
                    regularization=s.regularization,
                    learning_rate=s.learning_rate,
                    optimizer_name=s.optimizer,
                    batch_size=s.batch_size,
                    seed=block_seed(s.seed, epoch, p, q),
                    device_preference=s.device,
                )
                self.users[p] = self._submit(pick, result, 0, anywhere=True)
                self.items[q] = self._submit(pick, result, 1, anywhere=True)
                sums.append(self._submit(pick, result, 2, anywhere=True))
        totals = self.client.gather(sums)
        n = max(1, self.ingest.n_ratings)
        loss = sum(t[0] for t in totals) / n
        rmse = math.sqrt(sum(t[1] for t in totals) / n)
        return [Measurement(epoch, loss, {"train_rmse": rmse})]
