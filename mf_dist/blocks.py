"""The block grid, the order blocks are visited in, and a block of factor rows.

Users and items are cut into contiguous ranges of ``block_size`` indices.
A ratings block (p, q) holds user block p × item block q; a co-occurrence tile
(b, c) holds X restricted to item blocks b × c; a :class:`RowBlock` holds the
factor rows of one block of a table.

This module is the bottom of the math layer and is imported by the command
line, which must start without torch: torch appears in annotations only.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

OptimizerState = dict[int, dict[str, Any]]
"""A torch optimiser's per-parameter state (``state_dict()["state"]``), CPU tensors between tasks."""


@dataclass(frozen=True)
class BlockGrid:
    """``n_rows`` indices cut into blocks of ``block_size`` (the last may be shorter)."""

    n_rows: int
    block_size: int

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.n_rows < 0:
            raise ValueError(f"n_rows must be >= 0, got {self.n_rows}")

    @property
    def n_blocks(self) -> int:
        return -(-self.n_rows // self.block_size)

    def bounds(self, block: int) -> tuple[int, int]:
        """Half-open index range ``[start, stop)`` of ``block``."""
        if not 0 <= block < self.n_blocks:
            raise IndexError(f"block {block} outside 0..{self.n_blocks - 1}")
        start = block * self.block_size
        return start, min(start + self.block_size, self.n_rows)

    def size(self, block: int) -> int:
        start, stop = self.bounds(block)
        return stop - start

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        """Yield ``(block, start, stop)`` for every block."""
        for block in range(self.n_blocks):
            yield (block, *self.bounds(block))


def row_pieces(work: np.ndarray, pieces: int) -> list[tuple[int, int]]:
    """Cut rows ``[0, len(work))`` into at most ``pieces`` non-empty ranges of about equal total work."""
    if pieces <= 1 or len(work) <= 1:
        return [(0, len(work))]
    cumulative = np.cumsum(work, dtype=np.float64)
    targets = cumulative[-1] * np.arange(1, pieces) / pieces
    # Each cut goes after the row in which its target share of the work is reached.
    cuts = np.unique(np.searchsorted(cumulative, targets, side="left") + 1)
    bounds = [0, *[int(cut) for cut in cuts if 0 < cut < len(work)], len(work)]
    return list(itertools.pairwise(bounds))


def upper_triangle(n_blocks: int) -> list[tuple[int, int]]:
    """Tile coordinates (b, c) with b <= c: the stored half of a symmetric matrix."""
    return [(b, c) for b in range(n_blocks) for c in range(b, n_blocks)]


def dsgd_strata(n_row_blocks: int, n_col_blocks: int) -> list[list[tuple[int, int]]]:
    """The stratified schedule of DSGD (Gemulla et al., KDD 2011).

    With ``d = max(P, Q)``, sub-epoch ``s`` holds the blocks ``(p, (p + s) mod d)``
    that exist. Within one stratum no two blocks share a row block or a column
    block, so their updates touch disjoint factor rows and may run at once;
    over the ``d`` strata every block appears exactly once.
    """
    d = max(n_row_blocks, n_col_blocks)
    strata = []
    for shift in range(d):
        stratum = [(p, (p + shift) % d) for p in range(n_row_blocks) if (p + shift) % d < n_col_blocks]
        if stratum:
            strata.append(stratum)
    return strata


@dataclass
class RowBlock:
    """One block of factor rows: vectors (n × k), biases (n) or None, and their optimiser state.

    Tensors live on the CPU between tasks; a task moves them to its device.
    """

    vectors: Tensor
    bias: Tensor | None = None
    state: OptimizerState = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return int(self.vectors.shape[0])
