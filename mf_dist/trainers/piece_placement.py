"""Which worker each row piece of a side lives on, so that every worker gets an equal share of entries.

Dask runs a task where most of its input bytes already are, and a piece's
entries are its largest input, so a piece is solved on the worker that holds
it. Left to where its inputs happened to be made, a crowded side can end up
mostly on one worker, which then solves it while the others idle (at
ML-20M's shape one item block holds 79 % of the likes). Placing the pieces
by longest-processing-time-first on the least loaded worker balances it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def least_loaded_placement(loads: Mapping[str, int], sizes: Sequence[int]) -> list[str]:
    """A worker for every size, largest first, each on the worker with the least load so far.

    ``loads``: entries each worker already holds (the blocks that stay where
    they are); ``sizes``: entries of each new piece. Returns one worker
    address per size, in the order of ``sizes``; ties go to the first worker
    in ``loads``' order, so the placement is deterministic.
    """
    if not loads:
        raise ValueError("no workers to place pieces on")
    totals = dict(loads)
    placement: list[str] = [""] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        worker = min(totals, key=lambda address: totals[address])
        placement[index] = worker
        totals[worker] += sizes[index]
    return placement
