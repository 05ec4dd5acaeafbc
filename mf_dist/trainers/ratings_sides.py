"""The observed entries of the ratings matrix, kept on the workers from both sides.

ALS alternates between solving every user row (it needs each user block's
entries with global item indices) and every item row (each item block's
entries with global user indices). Both views are built once at the start of
training and stay on the workers as futures; only factor blocks travel after
that.

Each block's rows may be cut into pieces that are solved as separate tasks
(:func:`plan_pieces`). The plan, and the worker each piece is kept on, come
from the per-row entry counts ingest wrote beside the id maps, so every task
of the first epoch is submitted at once: nothing waits for the data to be
read before the solves are planned, and the item side is cut and merged
straight into its pieces while the first user solves run.

Work functions here run on the workers; they take and return CPU tensors.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from distributed import Client, Future
from torch import Tensor

from mf_dist.blocks import BlockGrid, row_pieces
from mf_dist.errors import ConfigError
from mf_dist.storage.ingested import IngestResult, liked_mask
from mf_dist.storage.store import read_schema, read_table
from mf_dist.trainers.base import TaskSubmitter
from mf_dist.trainers.piece_placement import least_loaded_placement
from mf_dist.trainers.tasks import pick

RowRange = tuple[int, int]

# A block with more than this many times its side's mean entries is cut into
# row pieces of about the mean (see :func:`plan_pieces`).
SPLIT_FACTOR = 1.25


@dataclass
class SideEntries:
    """One row block's entries: local ``rows`` (sorted), global ``cols`` of the other side, ``values``."""

    rows: Tensor
    cols: Tensor
    values: Tensor
    n_rows: int

    def __sizeof__(self) -> int:
        return 20 * len(self.values) + 64


def _sorted_entries(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n_rows: int) -> SideEntries:
    # Ingest writes its blocks sorted by (user, item); checking that is a
    # fraction of the two-key sort, which stays for files written otherwise.
    rising = np.diff(rows)
    if not (np.all(rising >= 0) and np.all((rising > 0) | (np.diff(cols) >= 0))):
        order = np.lexsort((cols, rows))
        rows, cols, values = rows[order], cols[order], values[order]
    return SideEntries(
        rows=torch.from_numpy(rows.astype(np.int64)),
        cols=torch.from_numpy(cols.astype(np.int64)),
        values=torch.from_numpy(values.astype(np.float32)),
        n_rows=n_rows,
    )


def read_user_block(path: str, user_start: int, n_rows: int, like_threshold: float | None) -> SideEntries:
    """A user block's entries (all of them, or only the liked ones when ``like_threshold`` is set)."""
    table = read_table(path)
    users, items, ratings = (table[name].to_numpy() for name in ("user", "item", "rating"))
    if like_threshold is not None:
        # The rule ingest counted the likes by, so the plan's counts are these entries'.
        liked = liked_mask(ratings, like_threshold)
        users, items, ratings = users[liked], items[liked], ratings[liked]
    return _sorted_entries(users - user_start, items, ratings, n_rows)


def split_by_item_ranges(entries: SideEntries, user_start: int, bounds: np.ndarray) -> list[SideEntries]:
    """A user block's entries cut by item range, re-indexed item-side (local item, global user).

    ``bounds`` (P + 1,) are the ranges' global item boundaries, ascending from
    0 to the number of items; piece p holds items ``[bounds[p], bounds[p + 1])``
    with row 0 at ``bounds[p]``, its entries in the block's (user, item) order.
    """
    cols = entries.cols.numpy()
    piece = np.searchsorted(bounds, cols, side="right") - 1
    # A stable sort on small integer keys is a radix sort: linear, and it keeps (user, item) order.
    key_type = np.int16 if len(bounds) <= np.iinfo(np.int16).max else np.int32
    order = torch.from_numpy(np.argsort(piece.astype(key_type), kind="stable"))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(piece, minlength=len(bounds) - 1))])
    items = entries.cols[order]
    users = entries.rows[order] + user_start
    values = entries.values[order]
    # Each piece owns its memory: a pickled view of a tensor carries its whole
    # storage, so a piece sent to another worker would carry the whole block.
    return [
        SideEntries(
            rows=items[first:last] - int(bounds[p]),
            cols=users[first:last].clone(),
            values=values[first:last].clone(),
            n_rows=int(bounds[p + 1] - bounds[p]),
        )
        for p, (first, last) in enumerate(itertools.pairwise(offsets))
    ]


def merge_pieces(n_rows: int, *pieces: SideEntries) -> SideEntries:
    """One item piece's entries from every user block (in user block order), sorted by (item, user).

    Each piece is in ascending user order already (its user block's entries
    are sorted by user), so one stable sort by item gives (item, user) order;
    on 16-bit keys numpy's stable sort is a radix sort, linear in the entries
    (a two-key lexsort took a second for the 4.5 M entries of ML-20M's most
    liked item block).
    """
    rows = torch.cat([p.rows for p in pieces])
    key_type = np.int16 if n_rows <= np.iinfo(np.int16).max else np.int32
    order = torch.from_numpy(np.argsort(rows.numpy().astype(key_type), kind="stable"))
    return SideEntries(
        rows=rows[order],
        cols=torch.cat([p.cols for p in pieces])[order],
        values=torch.cat([p.values for p in pieces])[order],
        n_rows=n_rows,
    )


def row_entry_counts(ingest: IngestResult, *, liked_only: bool) -> tuple[np.ndarray, np.ndarray]:
    """Entries per user and per item (int64): the likes, or every rating, that training reads.

    Read from the counts ingest wrote beside the id maps, not from the data.
    """
    column = "n_likes" if liked_only else "n_ratings"
    counts = []
    for path in (ingest.users_path, ingest.items_path):
        names = read_schema(path).names
        if column not in names:
            raise ConfigError(
                f"{path} has no {column!r} column: it was written by an older mf-dist; "
                "run the ingest stage again (mf-dist run does when the code has changed)"
            )
        counts.append(read_table(path, columns=[column])[column].to_numpy().astype(np.int64))
    return counts[0], counts[1]


def plan_pieces(row_counts: np.ndarray, grid: BlockGrid, *, split: bool) -> list[list[RowRange]]:
    """Per block of ``grid``: the local row ranges its rows are solved in, in order.

    The work of a block is proportional to its entries, and popular items
    crowd into few blocks (one item block of ML-20M's shape holds 79 % of
    the likes), so one task would hold up the whole side while the other
    workers idle. With ``split``, a block with more than ``SPLIT_FACTOR``
    times the side's mean entries per block is cut into pieces of about the
    mean, balanced by ``row_counts`` (entries per row of the side); a row is
    never cut. Every row is solved independently, so the cut depends on the
    data only and the result stays the same. Without ``split`` every block
    is one piece (the gradient solvers keep optimiser state per block).
    """
    if len(row_counts) != grid.n_rows:
        raise ValueError(f"{len(row_counts)} row counts for a grid of {grid.n_rows} rows")
    block_counts = [int(row_counts[start:stop].sum()) for _, start, stop in grid]
    mean = max(1.0, sum(block_counts) / max(1, len(block_counts)))
    plan = []
    for (_, start, stop), count in zip(grid, block_counts, strict=True):
        pieces = math.ceil(count / mean) if split and count > SPLIT_FACTOR * mean else 1
        plan.append(row_pieces(row_counts[start:stop], pieces))
    return plan


def slice_rows(entries: SideEntries, start: int, stop: int) -> SideEntries:
    """The entries of rows ``[start, stop)``, re-indexed so that row ``start`` is 0; its own copy.

    Not a view: the block can be freed, and a piece sent to another worker
    does not carry the block's whole storage with it (as a pickled view would).
    """
    first, last = np.searchsorted(entries.rows.numpy(), [start, stop])
    return SideEntries(
        rows=entries.rows[first:last] - start,
        cols=entries.cols[first:last].clone(),
        values=entries.values[first:last].clone(),
        n_rows=stop - start,
    )


@dataclass
class RatingsSides:
    """Futures of :class:`SideEntries` for every row piece of every block of both sides.

    ``users[b][p]`` holds the rows ``user_ranges[b][p]`` of user block b,
    re-indexed so that the range's first row is row 0; likewise for items.
    """

    users: list[list[Future]]
    items: list[list[Future]]
    user_ranges: list[list[RowRange]]
    item_ranges: list[list[RowRange]]
    n_entries: int

    def user_blocks(self) -> list[Future]:
        """One future per user block; only for sides loaded without ``split``."""
        return _whole_blocks(self.users)

    def item_blocks(self) -> list[Future]:
        """One future per item block; only for sides loaded without ``split``."""
        return _whole_blocks(self.items)


def _whole_blocks(pieces: list[list[Future]]) -> list[Future]:
    if any(len(block) != 1 for block in pieces):
        raise ValueError("this side was cut into row pieces; take its pieces, not whole blocks")
    return [block[0] for block in pieces]


def load_ratings_sides(
    client: Client,
    ingest: IngestResult,
    *,
    liked_only: bool,
    resources: dict[str, float] | None,
    split: bool = False,
) -> RatingsSides:
    """Build both views of the ingested ratings on the workers, cut as :func:`plan_pieces` plans.

    Submits everything and returns at once. Each side's pieces are placed
    by entry count on the workers that may run training tasks (largest
    first on the least loaded, :func:`least_loaded_placement`), so that
    each worker holds, and later solves, an equal share of either side:
    Dask runs a task where most of its input bytes already are, and a
    piece's entries are its largest input. The placement is a preference;
    another worker may take a piece when its own is gone. Under
    ``resources`` nothing is placed (see :class:`_PlacedSubmitter`).
    """
    threshold = ingest.like_threshold if liked_only else None
    user_counts, item_counts = row_entry_counts(ingest, liked_only=liked_only)
    user_ranges = plan_pieces(user_counts, ingest.user_grid, split=split)
    item_ranges = plan_pieces(item_counts, ingest.item_grid, split=split)
    submit = _PlacedSubmitter(client, resources)

    user_pieces = [
        [(start + a, start + b) for a, b in ranges]
        for (_, start, _), ranges in zip(ingest.user_grid, user_ranges, strict=True)
    ]
    user_places = _grouped_like(
        submit.places([int(user_counts[a:b].sum()) for pieces in user_pieces for a, b in pieces]), user_ranges
    )
    # A block is read where its first piece goes; the other pieces are cut there and sent on.
    blocks = [
        submit(read_user_block, places[0], str(ingest.ratings_path(p)), start, stop - start, threshold)
        for (p, start, stop), places in zip(ingest.user_grid, user_places, strict=True)
    ]
    users = [
        [block]
        if len(ranges) == 1
        else [submit(slice_rows, place, block, a, b) for (a, b), place in zip(ranges, places, strict=True)]
        for block, ranges, places in zip(blocks, user_ranges, user_places, strict=True)
    ]

    item_pieces = [
        (start + a, start + b)
        for (_, start, _), ranges in zip(ingest.item_grid, item_ranges, strict=True)
        for a, b in ranges
    ]
    bounds = np.array([0, *[stop for _, stop in item_pieces]], dtype=np.int64)
    splits = [
        submit(split_by_item_ranges, places[0], block, start, bounds)
        for block, (_, start, _), places in zip(blocks, ingest.user_grid, user_places, strict=True)
    ]
    item_places = submit.places([int(item_counts[a:b].sum()) for a, b in item_pieces])
    merged = [
        submit(merge_pieces, place, b - a, *[submit.anywhere(pick, cut, q) for cut in splits])
        for q, ((a, b), place) in enumerate(zip(item_pieces, item_places, strict=True))
    ]
    return RatingsSides(
        users=users,
        items=_grouped_like(merged, item_ranges),
        user_ranges=user_ranges,
        item_ranges=item_ranges,
        n_entries=ingest.n_likes if liked_only else ingest.n_ratings,
    )


def _grouped_like(flat: list, groups: list[list]) -> list[list]:
    """``flat`` cut into consecutive lists as long as those of ``groups`` (one per block)."""
    firsts = np.cumsum([0, *[len(group) for group in groups]])
    return [flat[first:last] for first, last in itertools.pairwise(firsts)]


class _PlacedSubmitter:
    """Training tasks (:class:`~mf_dist.trainers.base.TaskSubmitter`) with a preferred worker, or none."""

    def __init__(self, client: Client, resources: dict[str, float] | None) -> None:
        self.submit = TaskSubmitter(client, resources)
        # Not under resource restrictions: when a preferred worker has left,
        # Dask's fallback for a loose preference ignores them, and a task
        # could wait forever on a worker without the resource.
        self.workers = [] if resources else list(client.scheduler_info(n_workers=-1)["workers"])

    def places(self, sizes: list[int]) -> list[str | None]:
        """A preferred worker per size; none while no worker has joined yet, or under resources."""
        if not self.workers:
            return [None] * len(sizes)
        return list(least_loaded_placement(dict.fromkeys(self.workers, 0), sizes))

    def __call__(self, function: Callable, place: str | None, *args: object) -> Future:
        where: dict[str, object] = {"workers": [place], "allow_other_workers": True} if place else {}
        return self.submit(function, *args, **where)

    def anywhere(self, function: Callable, *args: object) -> Future:
        """A task that only unpacks a result: on any worker, placed by Dask."""
        return self.submit(function, *args, anywhere=True)
