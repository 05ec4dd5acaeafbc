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
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import torch
from distributed import Client, Future

from mf_dist.blocks import BlockGrid, dsgd_strata
from mf_dist.cluster import compute_device
from mf_dist.errors import TrainingError
from mf_dist.factor_files import EpochRecord, FactorTable, TrainResult, block_seed, write_factor_block
from mf_dist.ingest import IngestResult
from mf_dist.models import explicit as objective
from mf_dist.solvers.gradient import RowBlock, sparse_adam_pass

logger = logging.getLogger(__name__)

EpochCallback = Callable[[EpochRecord], None]

RatingsBlock = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

INITIAL_SCALE = 0.1


def load_ratings_blocks(path: str, user_start: int, item_grid: BlockGrid) -> list[RatingsBlock]:
    """One user block's ratings cut by item block: (user row, item row, rating) per block."""
    table = pq.read_table(path)
    users = torch.from_numpy(table["user"].to_numpy().astype("int64")) - user_start
    items = torch.from_numpy(table["item"].to_numpy().astype("int64"))
    ratings = torch.from_numpy(table["rating"].to_numpy())
    blocks = []
    for _, start, stop in item_grid:
        inside = (items >= start) & (items < stop)
        blocks.append((users[inside], items[inside] - start, ratings[inside]))
    return blocks


def pick(sequence: tuple | list, index: int) -> object:
    return sequence[index]


def ratings_count(block: RatingsBlock) -> int:
    return len(block[2])


def initial_row_block(n_rows: int, rank: int, seed: int) -> RowBlock:
    generator = torch.Generator().manual_seed(seed)
    return RowBlock(
        vectors=torch.randn(n_rows, rank, generator=generator) * INITIAL_SCALE,
        bias=torch.zeros(n_rows),
    )


def train_ratings_block(
    ratings: RatingsBlock,
    users: RowBlock,
    items: RowBlock,
    *,
    global_mean: float,
    regularization: float,
    learning_rate: float,
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
        batch_size=batch_size,
        generator=torch.Generator().manual_seed(seed),
        device=compute_device(device_preference),
    )
    return new_users, new_items, (total, squared_error)


def save_row_block(table: FactorTable, block: int, rows: RowBlock) -> None:
    write_factor_block(table, block, rows.vectors.numpy(), rows.bias.numpy())


def describe_device(device_preference: str) -> str:
    return str(compute_device(device_preference))


def train_explicit(
    client: Client,
    ingest: IngestResult,
    directory: Path,
    *,
    rank: int,
    epochs: int,
    learning_rate: float,
    regularization: float,
    batch_size: int,
    seed: int,
    device: str = "auto",
    resources: dict[str, float] | None = None,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Fit r̂ = μ + b_u + b_i + uᵀv on the ingested ratings; see the module docstring.

    Epoch e's loss is the objective per rating (squared error plus the L2
    penalty), summed over each batch just before its step; ``train_rmse`` is
    measured the same way. Raises :class:`TrainingError` when it is not finite.
    """
    user_grid, item_grid = ingest.user_grid, ingest.item_grid

    def submit(function: Callable, *args: object, **kwargs: object) -> Future:
        return client.submit(function, *args, resources=resources, pure=False, **kwargs)

    per_user_block = [
        submit(load_ratings_blocks, str(ingest.ratings_path(p)), start, item_grid)
        for p, start, _ in user_grid
    ]
    ratings = {
        (p, q): submit(pick, per_user_block[p], q)
        for p in range(user_grid.n_blocks)
        for q in range(item_grid.n_blocks)
    }
    counts = client.gather([client.submit(ratings_count, block) for block in ratings.values()])
    sizes = dict(zip(ratings, counts, strict=True))
    del per_user_block
    users = [
        submit(initial_row_block, stop - start, rank, block_seed(seed, 0, 0, block))
        for block, start, stop in user_grid
    ]
    items = [
        submit(initial_row_block, stop - start, rank, block_seed(seed, 0, 1, block))
        for block, start, stop in item_grid
    ]

    history: list[EpochRecord] = []
    started = time.perf_counter()
    strata = dsgd_strata(user_grid.n_blocks, item_grid.n_blocks)
    for epoch in range(1, epochs + 1):
        sums: list[Future] = []
        for stratum in strata:
            for p, q in stratum:
                if sizes[p, q] == 0:
                    continue
                result = submit(
                    train_ratings_block,
                    ratings[p, q],
                    users[p],
                    items[q],
                    global_mean=ingest.global_mean,
                    regularization=regularization,
                    learning_rate=learning_rate,
                    batch_size=batch_size,
                    seed=block_seed(seed, epoch, p, q),
                    device_preference=device,
                )
                users[p] = client.submit(pick, result, 0)
                items[q] = client.submit(pick, result, 1)
                sums.append(client.submit(pick, result, 2))
        totals = client.gather(sums)
        loss = sum(t[0] for t in totals) / ingest.n_ratings
        rmse = math.sqrt(sum(t[1] for t in totals) / ingest.n_ratings)
        if not math.isfinite(loss):
            raise TrainingError(
                f"the explicit-ratings loss became non-finite at epoch {epoch}: "
                f"lower --learning-rate (now {learning_rate})"
            )
        history.append(
            EpochRecord(
                epoch=epoch,
                loss=loss,
                metrics={"train_rmse": rmse},
                seconds=time.perf_counter() - started,
            )
        )
        logger.info("explicit epoch %d: loss %.5f, train RMSE %.4f", epoch, loss, rmse)
        if on_epoch:
            on_epoch(history[-1])

    tables = []
    saves = []
    for name, grid, blocks in (("users", user_grid, users), ("items", item_grid, items)):
        table = FactorTable(
            name=name,
            directory=str(directory / name),
            n_rows=grid.n_rows,
            block_size=grid.block_size,
            rank=rank,
            has_bias=True,
        )
        tables.append(table)
        saves += [client.submit(save_row_block, table, b, rows) for b, rows in enumerate(blocks)]
    client.gather(saves)
    return TrainResult(
        model="explicit",
        rank=rank,
        epochs=epochs,
        learning_rate=learning_rate,
        history=history,
        tables=tables,
        global_mean=ingest.global_mean,
        device=submit(describe_device, device).result(),
    )
