"""Math on one block of factor rows that every model shares: its Gram matrix and a random start.

A Gram is summed over the blocks of a table on the cluster; in float64 the
sum of a few hundred k × k blocks does not lose the digits a loss formed as
a difference of large terms needs. A random start is drawn from a seed made
of the block's coordinates (:func:`mf_dist.storage.factor_files.block_seed`),
so it does not depend on the worker that draws it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gram(vectors: Tensor) -> Tensor:
    """VᵀV of a row block (n × k → k × k), float64 on ``vectors``' device, whatever their dtype."""
    wide = vectors.double()
    return wide.T @ wide


def random_rows(n_rows: int, rank: int, scale: float, seed: int) -> Tensor:
    """``n_rows`` × ``rank`` float32 CPU entries from N(0, scale²), drawn by a generator seeded with ``seed``.

    The one random start of every trainer's rows; the same seed gives the same rows on any machine.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, rank, generator=generator) * scale
