"""Small worker-side functions every trainer submits or calls: unpacking, summing, packing row blocks.

They run on the workers and take and return CPU tensors (or whatever the
tasks they follow returned). Sums run in the order their arguments are
given, so a result does not depend on which task finished first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mf_dist.blocks import OptimizerState, RowBlock
from mf_dist.solvers.rows import random_rows


def pick(sequence: Sequence, index: int) -> object:
    """Element ``index`` of a task's tuple or list result."""
    return sequence[index]


def sum_tensors(*tensors: Tensor) -> Tensor:
    """Σ of same-shaped tensors in the given order, into a new tensor of the first one's dtype."""
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total += tensor
    return total


def sum_picked(index: int, *results: Sequence) -> object:
    """Σ of element ``index`` of each result, in order: tensors by :func:`sum_tensors`, else as a float.

    One task instead of a :func:`pick` per result and a sum.
    """
    picked = [r[index] for r in results]
    return sum_tensors(*picked) if isinstance(picked[0], Tensor) else float(sum(picked))


def zeros_like_block(vectors: Tensor) -> Tensor:
    return torch.zeros_like(vectors)


def random_row_block(n_rows: int, rank: int, scale: float, seed: int, with_bias: bool) -> RowBlock:
    """A fresh row block: N(0, scale²) vectors (n_rows × rank, float32), zero biases when ``with_bias``."""
    return RowBlock(
        vectors=random_rows(n_rows, rank, scale, seed),
        bias=torch.zeros(n_rows) if with_bias else None,
    )


def as_row_block(vectors: Tensor, state: OptimizerState | None) -> RowBlock:
    """A row block without biases from its vectors (n × k) and optimiser state (none: empty)."""
    return RowBlock(vectors=vectors, state=state or {})


def block_vectors(block: RowBlock) -> Tensor:
    return block.vectors


def block_state(block: RowBlock) -> OptimizerState:
    return block.state


def concatenate_vectors(*blocks: RowBlock) -> Tensor:
    """The whole side's vectors (rows × k) from its row blocks, in block order."""
    return torch.cat([b.vectors for b in blocks])


def concatenate_bias(*blocks: RowBlock) -> Tensor:
    """The whole side's biases (rows,) from its row blocks in order; zeros for blocks without biases."""
    return torch.cat([b.bias if b.bias is not None else torch.zeros(b.n_rows) for b in blocks])
