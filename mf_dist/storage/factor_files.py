"""Trained factors on disk: one ``.npy`` pair per row block, and the train summary.

``<dir>/block-00003.embedding.npy`` (float32, rows × rank) and, for models with
biases, ``block-00003.bias.npy`` (float32, rows). Loaded with
``allow_pickle=False``: nothing read from disk is unpickled.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel

from mf_dist.blocks import BlockGrid
from mf_dist.storage.store import join, load_array, make_dirs, save_array


class FactorTable(BaseModel):
    """A factor matrix stored as row blocks (``items`` or ``users``)."""

    name: str
    directory: str
    n_rows: int
    block_size: int
    rank: int
    has_bias: bool

    @property
    def grid(self) -> BlockGrid:
        return BlockGrid(self.n_rows, self.block_size)

    def embedding_path(self, block: int) -> str:
        return join(self.directory, f"block-{block:05d}.embedding.npy")

    def bias_path(self, block: int) -> str:
        return join(self.directory, f"block-{block:05d}.bias.npy")

    def read_block(self, block: int) -> tuple[np.ndarray, np.ndarray | None]:
        vectors = load_array(self.embedding_path(block))
        bias = load_array(self.bias_path(block)) if self.has_bias else None
        return vectors, bias


def write_factor_block(table: FactorTable, block: int, vectors: np.ndarray, bias: np.ndarray | None) -> None:
    """Write one row block of ``table`` (float32)."""
    make_dirs(table.directory)
    save_array(table.embedding_path(block), np.ascontiguousarray(vectors, dtype=np.float32))
    if table.has_bias:
        if bias is None:
            raise ValueError(f"table {table.name} has biases but block {block} has none")
        save_array(table.bias_path(block), np.ascontiguousarray(bias, dtype=np.float32))


class EpochRecord(BaseModel):
    """Loss after one epoch; ``metrics`` holds model-specific figures (e.g. train RMSE)."""

    epoch: int
    loss: float
    metrics: dict[str, float] = {}
    seconds: float


class TrainResult(BaseModel):
    """What the train stage produced."""

    model: str
    solver: str = ""
    rank: int
    epochs: int
    stopped_early: bool = False
    learning_rate: float
    settings: dict[str, Any] = {}
    history: list[EpochRecord]
    tables: list[FactorTable]
    global_mean: float | None = None
    device: str

    @property
    def final_loss(self) -> float:
        return self.history[-1].loss

    def table(self, name: str) -> FactorTable:
        return next(t for t in self.tables if t.name == name)


def block_seed(seed: int, *path: int) -> int:
    """A 63-bit seed for one task, derived from the run seed and the task's coordinates.

    The same coordinates give the same seed on any worker, so results do not
    depend on where a task runs.
    """
    return int(np.random.SeedSequence([seed, *path]).generate_state(2, np.uint64)[0] >> np.uint64(1))
