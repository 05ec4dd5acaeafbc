"""Recommendations stage: every user's top-N items, as a published table.

The ``users`` and ``items`` tables of one run are cut into row blocks that
stay on the workers. For each block of users a chain of tasks walks the item
blocks in groups: each step scores the users against one group (a
block-by-block matmul, plus the biases and global mean when the tables carry
them), sets the items the user has already seen to −inf and keeps a running
top-N per user. Memory per step is O(block² + group × rank); no users × items
matrix exists anywhere, and the driver holds no vectors.

Score: the model's own prediction. ``explicit`` (the tables carry ``bias`` and
the manifest a ``global_mean``) ranks by the predicted rating
``global_mean + users.bias + items.bias + dot(u, v)``; the others by ``dot(u, v)``.

Seen items: the ingested training ratings (``<work>/ingest/ratings/``, held-out
ratings not included) that the model fitted: every rated item for a model
that fits rating values, the liked ones (rating >= ingest's like threshold)
for the others (:attr:`mf_dist.registry.ModelSpec.seen_items`). They are
excluded unless ``keep_seen``. The work directory must hold the ingest of the
run's own input (same fingerprint, same row counts); otherwise the stage
refuses rather than filter with the wrong ratings.

Ties: equal scores are ordered by item id (ascending, by the id's own order:
numbers numerically, strings lexicographically), so the table is the same on
any number of workers. A user with fewer than N unseen items gets fewer rows
(none when every item is seen).

Output, published like the embedding tables (see :mod:`mf_dist.stages.export`)::

    <output>/recommendations/runs/<run_id>/part-*.parquet   user_id, item_id, score, rank
    <output>/recommendations/runs/<run_id>/_manifest.json
    <output>/recommendations/LATEST
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
from distributed import Client, as_completed
from pydantic import BaseModel

from mf_dist.errors import ConfigError, OutputError
from mf_dist.registry import model_spec
from mf_dist.runtime.cluster import compute_device, training_resources
from mf_dist.stages.export import TARGET_PART_BYTES
from mf_dist.stages.neighbors import group_consecutive, load_ids, plan_blocks
from mf_dist.storage.ingested import IngestResult, liked_mask, load_ingest_result
from mf_dist.storage.publish import new_run_id, publish_run, staged_run, write_manifest
from mf_dist.storage.reader import find_run, output_of_run, read_manifest, run_in
from mf_dist.storage.schema import FORMAT_VERSION, recommendations_table_schema
from mf_dist.storage.store import join, read_table, write_table

logger = logging.getLogger(__name__)

RECOMMENDATIONS_TABLE = "recommendations"

# Item blocks scored by one task (see mf_dist.stages.neighbors).
CANDIDATE_GROUP_BYTES = 256 * 1024 * 1024

# Tie key of an empty slot of the running top-N: after every real item.
NO_ITEM = np.iinfo(np.int64).max


class RecommendResult(BaseModel):
    """What the recommendations stage published."""

    run_id: str
    path: str
    rows: int
    n: int
    users: int
    users_short: int
    seen: str
    source_run_id: str
    files: list[str]
    device: str


class Vectors(NamedTuple):
    """A part file's vectors (rows, rank) float32 and biases (rows,) float32 (zeros without a bias column)."""

    vectors: np.ndarray
    bias: np.ndarray


class QueryBlock:
    """Some users' vectors and biases (table rows ``rows``), on the worker's device."""

    def __init__(self, rows: np.ndarray, vectors: np.ndarray, bias: np.ndarray, device: str) -> None:
        self.rows = rows
        self.device_preference = device
        target = compute_device(device)
        self.vectors = torch.from_numpy(vectors).to(target)
        self.bias = torch.from_numpy(bias).to(target)

    def __reduce__(self) -> tuple:
        return (
            QueryBlock,
            (self.rows, self.vectors.cpu().numpy(), self.bias.cpu().numpy(), self.device_preference),
        )

    def __len__(self) -> int:
        return len(self.rows)


class ItemBlock:
    """Items ``offset:offset+len`` of the table, reordered by id: column j is table row ``rows[j]``.

    ``tie`` is each column's position in the id order of the whole table;
    ``column_of`` maps ``row - offset`` back to its column.
    """

    def __init__(
        self,
        offset: int,
        rows: np.ndarray,
        tie: np.ndarray,
        vectors: np.ndarray,
        bias: np.ndarray,
        device: str,
    ) -> None:
        self.offset = offset
        self.device_preference = device
        target = compute_device(device)
        self.rows = torch.from_numpy(rows).to(target)
        self.tie = torch.from_numpy(tie).to(target)
        self.column_of = torch.from_numpy(np.argsort(rows - offset)).to(target)
        self.vectors = torch.from_numpy(vectors).to(target)
        self.bias = torch.from_numpy(bias).to(target)

    def __reduce__(self) -> tuple:
        return (
            ItemBlock,
            (
                self.offset,
                self.rows.cpu().numpy(),
                self.tie.cpu().numpy(),
                self.vectors.cpu().numpy(),
                self.bias.cpu().numpy(),
                self.device_preference,
            ),
        )

    def __len__(self) -> int:
        return len(self.rows)


class TopN(NamedTuple):
    """Running top-N of a query block: scores best first, item table rows (−1: none), tie keys."""

    scores: np.ndarray
    rows: np.ndarray
    tie: np.ndarray


class Seen(NamedTuple):
    """Seen (query position, item row) pairs of one query block."""

    positions: np.ndarray
    items: np.ndarray


def load_part(path: str, rank: int) -> Vectors:
    """The embedding (and bias, if any) columns of one part file."""
    table = read_table(path)
    column = table["embedding"].combine_chunks()
    vectors = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, rank)
    if "bias" in table.column_names:
        bias = table["bias"].to_numpy().astype(np.float32)
    else:
        bias = np.zeros(len(vectors), np.float32)
    return Vectors(np.ascontiguousarray(vectors), bias)


def id_order_keys(ids: pa.Array) -> np.ndarray:
    """Each table row's position in the ascending order of the ids (the tie key)."""
    order = pc.sort_indices(ids).to_numpy()
    keys = np.empty(len(order), np.int64)
    keys[order] = np.arange(len(order), dtype=np.int64)
    return keys


def make_query_block(
    parts: list[Vectors], part_offsets: list[int], rows: np.ndarray, device: str
) -> QueryBlock:
    """The users at table ``rows`` (sorted), taken from the part files that hold them.

    Gathered part by part: concatenating the parts first copied a whole users table per block.
    """
    vectors = np.empty((len(rows), parts[0].vectors.shape[1]), np.float32)
    bias = np.empty(len(rows), np.float32)
    for part, offset in zip(parts, part_offsets, strict=True):
        inside = (rows >= offset) & (rows < offset + len(part.vectors))
        vectors[inside] = part.vectors[rows[inside] - offset]
        bias[inside] = part.bias[rows[inside] - offset]
    return QueryBlock(rows, vectors, bias, device)


def make_item_block(
    part: Vectors, start: int, stop: int, offset: int, tie_keys: np.ndarray, device: str
) -> ItemBlock:
    rows = np.arange(offset, offset + stop - start, dtype=np.int64)
    order = np.argsort(tie_keys[rows], kind="stable")
    return ItemBlock(
        offset,
        rows[order],
        tie_keys[rows[order]],
        part.vectors[start:stop][order].copy(),
        part.bias[start:stop][order].copy(),
        device,
    )


def load_seen(paths: list[str], rows: np.ndarray, like_threshold: float | None) -> Seen:
    """The (query position, item row) pairs of the users at ``rows`` in ingest's rating blocks ``paths``.

    The users table's rows are ingest's user indexes (export writes them in
    index order), so a user row is its index in the rating blocks.
    """
    positions, items = [], []
    for path in paths:
        table = read_table(path)
        user = table["user"].to_numpy()
        item = table["item"].to_numpy()
        rating = table["rating"].to_numpy()
        keep = liked_mask(rating, like_threshold) & np.isin(user, rows)
        positions.append(np.searchsorted(rows, user[keep]))
        items.append(item[keep].astype(np.int64))
    if not positions:
        return Seen(np.zeros(0, np.int64), np.zeros(0, np.int64))
    return Seen(np.concatenate(positions).astype(np.int64), np.concatenate(items))


def _order_by(scores: torch.Tensor, tie: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Each row sorted by score (descending), equal scores by tie key (ascending)."""
    by_tie = torch.argsort(tie, dim=1, stable=True)
    scores, tie = torch.gather(scores, 1, by_tie), torch.gather(tie, 1, by_tie)
    others = tuple(torch.gather(other, 1, by_tie) for other in others)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return [torch.gather(tensor, 1, by_score) for tensor in (scores, tie, *others)]


def block_top(scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``keep`` best (score, column), in no particular order; ties at the cut go to lower columns.

    ``torch.topk`` picks among entries tied with the k-th score arbitrarily;
    where such a tie is cut (a row has more entries equal to its k-th score
    than were kept) the row is re-done by a stable full sort, which keeps
    the lowest columns, i.e. the lowest item ids (a block's columns are in id
    order). Cut ties at −inf (seen items, empty slots) are never published
    and need no care. Ties are rare in real scores, so nearly every row costs
    a top-k instead of a sort.
    """
    if keep >= scores.shape[1]:
        return torch.sort(scores, dim=1, descending=True, stable=True)
    values, columns = torch.topk(scores, keep, dim=1, sorted=False)
    kth = values.min(dim=1, keepdim=True).values
    cut = ((scores == kth).sum(dim=1) != (values == kth).sum(dim=1)) & torch.isfinite(kth[:, 0])
    if bool(cut.any()):
        rows = cut.nonzero()[:, 0]
        redone, redone_columns = torch.sort(scores[rows], dim=1, descending=True, stable=True)
        values[rows], columns[rows] = redone[:, :keep], redone_columns[:, :keep]
    return values, columns


def fold_items(
    running: TopN | None,
    query: QueryBlock,
    seen: Seen | None,
    candidates: list[ItemBlock],
    n: int,
    global_mean: float,
) -> TopN:
    """Merge the scores of ``query`` against each item block of ``candidates`` into the running top-N.

    Seen items score −inf; so do the empty slots, whose row is −1. The
    writer drops every −inf. On the CPU a compiled loop merges the scores
    tile by tile (:func:`fold_items_compiled`), elsewhere torch
    (:func:`fold_items_torch`); both give the same top-N.
    """
    if query.vectors.device.type == "cpu" and _compiled_merge_applies(query, candidates):
        return fold_items_compiled(running, query, seen, candidates, n, global_mean)
    return fold_items_torch(running, query, seen, candidates, n, global_mean)


def fold_items_torch(
    running: TopN | None,
    query: QueryBlock,
    seen: Seen | None,
    candidates: list[ItemBlock],
    n: int,
    global_mean: float,
) -> TopN:
    """:func:`fold_items` in torch on any device: a top-k per item block merged by a sort.

    The GPU's path, and the CPU's where a vector is not finite (NaN scores
    reach the writer, which refuses them).
    """
    device = query.vectors.device
    users = len(query)
    if running is None:
        best_scores = torch.full((users, n), float("-inf"), device=device)
        best_rows = torch.full((users, n), -1, dtype=torch.int64, device=device)
        best_tie = torch.full((users, n), NO_ITEM, dtype=torch.int64, device=device)
    else:
        best_scores = torch.from_numpy(running.scores).to(device)
        best_rows = torch.from_numpy(running.rows).to(device)
        best_tie = torch.from_numpy(running.tie).to(device)
    user_terms = query.bias + global_mean
    if seen is not None:
        seen_positions = torch.from_numpy(seen.positions).to(device)
        seen_items = torch.from_numpy(seen.items).to(device)
    for candidate in candidates:
        block = candidate.vectors.to(device)
        scores = query.vectors @ block.T + candidate.bias.to(device)[None, :] + user_terms[:, None]
        if seen is not None:
            inside = (seen_items >= candidate.offset) & (seen_items < candidate.offset + len(candidate))
            columns = candidate.column_of.to(device)[seen_items[inside] - candidate.offset]
            scores[seen_positions[inside], columns] = float("-inf")
        block_scores, block_columns = block_top(scores, min(n, len(candidate)))
        merged = _order_by(
            torch.cat([best_scores, block_scores], dim=1),
            torch.cat([best_tie, candidate.tie.to(device)[block_columns]], dim=1),
            torch.cat([best_rows, candidate.rows.to(device)[block_columns]], dim=1),
        )
        best_scores, best_tie, best_rows = (tensor[:, :n] for tensor in merged)
    return TopN(best_scores.cpu().numpy(), best_rows.cpu().numpy(), best_tie.cpu().numpy())


def _compiled_merge_applies(query: QueryBlock, candidates: list[ItemBlock]) -> bool:
    """Whether every vector and bias is finite (the compiled merge skips NaN scores, which the writer
    must see to refuse them) and the tie keys fit its 32 bits."""
    from mf_dist.ranking.top_n import MAX_TIE

    tensors = [query.vectors, query.bias, *(c.vectors for c in candidates), *(c.bias for c in candidates)]
    finite = all(bool(torch.isfinite(tensor).all()) for tensor in tensors)
    return finite and all(int(c.tie.max()) <= MAX_TIE for c in candidates if len(c))


def fold_items_compiled(
    running: TopN | None,
    query: QueryBlock,
    seen: Seen | None,
    candidates: list[ItemBlock],
    n: int,
    global_mean: float,
) -> TopN:
    """:func:`fold_items` on the CPU: scores tile by tile, merged into per-user heaps by a compiled loop.

    The same result as the torch path (:func:`mf_dist.ranking.top_n.merge_scores` is exact
    with the same tie rule), without a users × block score matrix or a sort per item block.
    """
    from mf_dist.ranking.top_n import merge_scores

    users = len(query)
    if running is None:
        best_scores = np.full((users, n), -np.inf, np.float32)
        best_rows = np.full((users, n), -1, np.int64)
        best_tie = np.full((users, n), NO_ITEM, np.int64)
    else:
        # Copies: the running top-N arrives from another task, possibly in a read-only buffer.
        best_scores, best_rows, best_tie = (np.array(part) for part in running)
    vectors = torch.cat([candidate.vectors for candidate in candidates])
    bias = torch.cat([candidate.bias for candidate in candidates])
    tie = torch.cat([candidate.tie for candidate in candidates]).numpy()
    rows = torch.cat([candidate.rows for candidate in candidates]).numpy()
    seen_start = np.zeros(users + 1, np.int64)
    seen_columns = np.zeros(0, np.int64)
    if seen is not None and len(seen.items):
        positions, columns, first_column = [], [], 0
        for candidate in candidates:
            inside = (seen.items >= candidate.offset) & (seen.items < candidate.offset + len(candidate))
            positions.append(seen.positions[inside])
            local = candidate.column_of.numpy()[seen.items[inside] - candidate.offset]
            columns.append(first_column + local)
            first_column += len(candidate)
        position, column = np.concatenate(positions), np.concatenate(columns)
        # One sort of (position, column) packed in an int64: a lexsort of the two took 20× longer
        # (33 against 1.7 ms for a block's 195,000 seen pairs).
        width = max(first_column, 1)
        seen_columns = np.sort(position.astype(np.int64) * width + column) % width
        seen_start[1:] = np.cumsum(np.bincount(position, minlength=users))
    merge_scores(
        query.vectors,
        query.bias + global_mean,
        vectors,
        bias,
        tie,
        rows,
        seen_start,
        seen_columns,
        best_scores,
        best_rows,
        best_tie,
    )
    return TopN(best_scores, best_rows, best_tie)


def write_recommendations_part(
    path: str,
    blocks: list[tuple[np.ndarray, TopN]],
    user_ids: pa.Array,
    item_ids: pa.Array,
    user_type: pa.DataType,
    item_type: pa.DataType,
) -> tuple[int, int]:
    """Write the top-N of consecutive query blocks as one Parquet file; returns (rows, users short of N)."""
    user_rows = np.concatenate([np.repeat(rows, top.scores.shape[1]) for rows, top in blocks])
    scores = np.concatenate([top.scores.reshape(-1) for _, top in blocks])
    item_rows = np.concatenate([top.rows.reshape(-1) for _, top in blocks])
    n = blocks[0][1].scores.shape[1]
    ranks = np.tile(np.arange(1, n + 1, dtype=np.int32), len(user_rows) // n)
    keep = np.isfinite(scores)
    if np.isnan(scores).any():
        raise OutputError(f"{path}: NaN scores; the embedding tables hold non-finite values")
    short = int(sum(int((~np.isfinite(top.scores)).any(axis=1).sum()) for _, top in blocks))
    schema = recommendations_table_schema(user_type, item_type)
    table = pa.Table.from_arrays(
        [
            user_ids.take(pa.array(user_rows[keep])).cast(user_type),
            item_ids.take(pa.array(item_rows[keep])).cast(item_type),
            pa.array(scores[keep].astype(np.float32)),
            pa.array(ranks[keep]),
        ],
        schema=schema,
    )
    # Dictionaries for the ids only: a score dictionary (nearly every score distinct) was
    # built and dropped for nothing (0.136 against 0.102 s of CPU for 3.3 M rows, same file size).
    write_table(
        table,
        path,
        durable=True,
        row_group_size=max(1, table.num_rows),
        use_dictionary=["user_id", "item_id"],
    )
    return table.num_rows, short


def describe_device(device_preference: str) -> str:
    return str(compute_device(device_preference))


def _table_run(source: str | Path, table: str, run_id: str | None) -> Path | str:
    if run_id is not None:
        return find_run(run_in(source, table, run_id), table)
    return find_run(source, table)


def check_ingest_matches(ingest: IngestResult, users: dict[str, Any], items: dict[str, Any]) -> None:
    """Refuse a work directory whose ingest is not the one the run trained on."""
    if "fold_in" in users:
        raise ConfigError(
            f"users run {users['run_id']} is a fold-in of run {users['fold_in']['base_run_id']}: "
            "the folded users' ratings are not in any ingest, so seen items cannot be filtered; "
            "keep seen items (--keep-seen)"
        )
    problems = []
    if users.get("input_fingerprint") not in (None, ingest.fingerprint):
        problems.append("another input fingerprint")
    if int(users["row_count"]) != ingest.n_users or int(items["row_count"]) != ingest.n_items:
        problems.append(
            f"{ingest.n_users} users × {ingest.n_items} items against the run's "
            f"{users['row_count']} × {items['row_count']}"
        )
    holdout = (users.get("config") or {}).get("holdout")
    if holdout is not None and float(holdout or 0.0) != ingest.holdout:
        problems.append(f"holdout {ingest.holdout} against the run's {holdout}")
    if problems:
        raise ConfigError(
            f"{ingest.directory}: this ingest is not the one run {users['run_id']} trained on "
            f"({'; '.join(problems)}), so its seen items cannot be filtered; "
            "give the run's own work directory, or keep seen items (--keep-seen)"
        )


def select_user_rows(user_ids: pa.Array, wanted: Sequence[Any]) -> tuple[np.ndarray, int]:
    """Table rows of the ``wanted`` user ids (sorted, unique) and how many ids are not in the table."""
    index = pd.Index(user_ids.to_pandas())
    positions = index.get_indexer(pd.Index(list(wanted)).unique())
    unknown = int((positions < 0).sum())
    return np.unique(positions[positions >= 0]).astype(np.int64), unknown


def _given_seen_rows(
    frame: pd.DataFrame, user_ids: pa.Array, item_ids: pa.Array, like_threshold: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """(user row, item row) of the given seen ratings, sorted by user row; unknown ids dropped."""
    if like_threshold is not None and "rating" in frame.columns:
        frame = frame[frame["rating"] >= like_threshold]
    users = pd.Index(user_ids.to_pandas()).get_indexer(frame["user_id"].to_numpy())
    items = pd.Index(item_ids.to_pandas()).get_indexer(frame["item_id"].to_numpy())
    known = (users >= 0) & (items >= 0)
    order = np.argsort(users[known], kind="stable")
    return users[known][order].astype(np.int64), items[known][order].astype(np.int64)


def _seen_of_block(given: tuple[np.ndarray, np.ndarray], rows: np.ndarray) -> Seen:
    users, items = given
    # ``users`` is sorted: only its slice between the block's first and last row can match.
    first, last = (
        np.searchsorted(users, [rows[0], rows[-1]], side="left")[0],
        np.searchsorted(users, rows[-1], side="right"),
    )
    users, items = users[first:last], items[first:last]
    inside = np.isin(users, rows)
    return Seen(np.searchsorted(rows, users[inside]).astype(np.int64), items[inside])


def recommend_items(
    client: Client,
    source: str | Path,
    n: int = 10,
    *,
    work_dir: str | Path | None = None,
    keep_seen: bool = False,
    users: Sequence[Any] | None = None,
    output: str | Path | None = None,
    source_run_id: str | None = None,
    block_size: int = 4096,
    run_id: str | None = None,
    device: str = "auto",
    on_block: Callable[[int, int], None] | None = None,
    publish: bool = True,
    seen_ratings: pd.DataFrame | None = None,
) -> RecommendResult:
    """Compute and publish the ``recommendations`` table of a run with ``users`` and ``items`` tables.

    ``source`` is the output directory (or its URL; ``work_dir`` and ``output``
    may be URLs as well); ``source_run_id`` picks a run
    (default: the current ``users`` run, whose ``items`` run must be the same
    run). ``work_dir`` holds the run's ingest, from which seen items are
    excluded unless ``keep_seen``. ``users`` restricts the table to those
    user ids (ids not in the table are counted and skipped). ``output``
    (default: ``source``) receives ``recommendations/``. With ``publish=False``
    ``LATEST`` is left to the caller (the flow commits a run's tables together,
    :func:`mf_dist.stages.export.publish_tables`); ``source_run_id`` may then
    name a run whose tables are in place but not yet current. Raises
    :class:`ConfigError` for a bad ``n`` or ``block_size``, or seen items that
    cannot be read, and :class:`OutputError` for a source without the tables.

    ``seen_ratings`` (``user_id``, ``item_id`` and, for the like rule, ``rating``
    columns) gives the seen items instead of an ingest: what ``mf-dist fold-in
    --recommend`` passes for the users it folded in (pairs of unknown ids are
    ignored; the like threshold is the run's config's).
    """
    if n < 1:
        raise ConfigError(f"n must be at least 1 (got {n})")
    if block_size < 1:
        raise ConfigError(f"block size must be at least 1 (got {block_size})")
    users_run = _table_run(source, "users", source_run_id)
    users_manifest = read_manifest(users_run)
    # A fold-in's users run names the items run its vectors go with.
    items_run = _table_run(source, "items", users_manifest.get("items_run_id", users_manifest["run_id"]))
    items_manifest = read_manifest(items_run)
    for manifest, table in ((users_manifest, "users"), (items_manifest, "items")):
        if manifest.get("table") != table or "embedding" not in manifest.get("columns", []):
            raise OutputError(f"{source}: no {table} embedding table (found {manifest.get('table')!r})")
    rank = int(users_manifest["rank"])
    if int(items_manifest["rank"]) != rank:
        raise OutputError(f"{users_run} and {items_run}: ranks {rank} and {items_manifest['rank']} differ")
    global_mean = float(users_manifest.get("global_mean") or 0.0)
    spec = model_spec(users_manifest["model"])
    seen_rule = "kept"
    ingest = None
    if seen_ratings is not None and not keep_seen:
        seen_rule = spec.seen_items
    elif not keep_seen:
        if work_dir is None:
            raise ConfigError(
                "seen items are read from the run's work directory: give it, or keep seen items (--keep-seen)"
            )
        try:
            ingest = load_ingest_result(work_dir)
        except FileNotFoundError as exc:
            raise ConfigError(
                f"{work_dir}: no ingest output to read seen items from; give the run's work directory "
                "or keep seen items (--keep-seen)"
            ) from exc
        check_ingest_matches(ingest, users_manifest, items_manifest)
        seen_rule = spec.seen_items
    like_threshold = ingest.like_threshold if ingest is not None and seen_rule == "liked" else None

    user_types = pa.type_for_alias(users_manifest["id_type"])
    item_types = pa.type_for_alias(items_manifest["id_type"])
    user_paths = [join(str(users_run), entry["name"]) for entry in users_manifest["files"]]
    item_paths = [join(str(items_run), entry["name"]) for entry in items_manifest["files"]]
    user_part_rows = [int(entry["rows"]) for entry in users_manifest["files"]]
    item_part_rows = [int(entry["rows"]) for entry in items_manifest["files"]]
    n_users = sum(user_part_rows)
    output_dir = output if output is not None else source
    run_id = run_id or new_run_id()
    resources = training_resources(client)

    user_ids = client.submit(load_ids, user_paths, users_manifest["id_column"], pure=False)
    item_ids = client.submit(load_ids, item_paths, items_manifest["id_column"], pure=False)
    unknown = 0
    if users is None:
        selected = np.arange(n_users, dtype=np.int64)
    else:
        selected, unknown = select_user_rows(user_ids.result(), users)
        if unknown:
            logger.warning("recommend: %d of the given user ids are not in %s; skipped", unknown, users_run)
    if len(selected) == 0:
        raise ConfigError(f"none of the given users is in {users_run}")
    given_seen = None
    if seen_ratings is not None and not keep_seen:
        given_seen = _given_seen_rows(
            seen_ratings,
            user_ids.result(),
            item_ids.result(),
            (users_manifest.get("config") or {}).get("like_threshold") if seen_rule == "liked" else None,
        )

    tie_keys = client.submit(id_order_keys, item_ids, pure=False)
    item_parts = [client.submit(load_part, path, rank, pure=False) for path in item_paths]
    item_specs = plan_blocks(item_part_rows, block_size)
    item_blocks = [
        client.submit(
            make_item_block,
            item_parts[spec.part],
            spec.start,
            spec.stop,
            spec.offset,
            tie_keys,
            device,
            resources=resources,
        )
        for spec in item_specs
    ]
    del item_parts
    candidate_groups = group_consecutive(
        [4 * (rank + 1) * (spec.stop - spec.start) for spec in item_specs], CANDIDATE_GROUP_BYTES
    )

    user_parts = [client.submit(load_part, path, rank, pure=False) for path in user_paths]
    part_starts = np.cumsum([0, *user_part_rows])
    query_rows = [selected[start : start + block_size] for start in range(0, len(selected), block_size)]
    finals = []
    for rows in query_rows:
        first, last = np.searchsorted(part_starts, [rows[0], rows[-1]], side="right") - 1
        query = client.submit(
            make_query_block,
            user_parts[first : last + 1],
            [int(part_starts[p]) for p in range(first, last + 1)],
            rows,
            device,
            resources=resources,
        )
        seen = None
        if ingest is not None:
            grid_blocks = sorted({int(row) // ingest.block_size for row in (rows[0], rows[-1])})
            paths = [str(ingest.ratings_path(block)) for block in range(grid_blocks[0], grid_blocks[-1] + 1)]
            seen = client.submit(load_seen, paths, rows, like_threshold, pure=False)
        elif given_seen is not None:
            seen = _seen_of_block(given_seen, rows)
        running = None
        for group in candidate_groups:
            running = client.submit(
                fold_items,
                running,
                query,
                seen,
                [item_blocks[index] for index in group],
                n,
                global_mean,
                resources=resources,
                pure=False,
            )
        finals.append(running)
    del user_parts
    if on_block is not None:
        for done, _ in enumerate(as_completed(finals), start=1):
            on_block(done, len(finals))

    bytes_per_row = (8 if pa.types.is_integer(user_types) else 24) + 24 + 8
    output_groups = group_consecutive(
        [bytes_per_row * n * len(rows) for rows in query_rows], TARGET_PART_BYTES
    )
    names = [f"part-{index:05d}.parquet" for index in range(len(output_groups))]
    table_dir = join(str(output_dir), RECOMMENDATIONS_TABLE)
    with staged_run(table_dir, run_id, "the recommendations table") as partial:
        written = client.gather(
            [
                client.submit(
                    write_recommendations_part,
                    join(str(partial), name),
                    [(query_rows[index], finals[index]) for index in group],
                    user_ids,
                    item_ids,
                    user_types,
                    item_types,
                    pure=False,
                )
                for group, name in zip(output_groups, names, strict=True)
            ]
        )
        rows = [count for count, _ in written]
        short = sum(count for _, count in written)
        compute_on = client.submit(describe_device, device, resources=resources, pure=False).result()
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "run_id": run_id,
            "table": RECOMMENDATIONS_TABLE,
            "n": n,
            "score": "predicted rating" if "bias" in users_manifest["columns"] else "dot",
            "seen": seen_rule,
            "ties": "item_id ascending",
            "id_columns": {"user_id": users_manifest["id_type"], "item_id": items_manifest["id_type"]},
            "columns": recommendations_table_schema(user_types, item_types).names,
            "row_count": int(sum(rows)),
            "users": len(selected),
            "users_short": short,
            "users_unknown": unknown,
            "files": [{"name": name, "rows": int(count)} for name, count in zip(names, rows, strict=True)],
            "source": {
                "tables": ["users", "items"],
                "path": str(output_of_run(users_run)),
                "run_id": users_manifest["run_id"],
                "model": users_manifest.get("model"),
                "rank": rank,
                "work_dir": None if ingest is None else ingest.directory,
                "seen_ratings": "given" if given_seen is not None else None,
            },
            "block_size": block_size,
            "device": compute_on,
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
        }
        write_manifest(partial, manifest)
    if publish:
        publish_run(table_dir, run_id)
    return RecommendResult(
        run_id=run_id,
        path=join(table_dir, "runs", run_id),
        rows=int(sum(rows)),
        n=n,
        users=len(selected),
        users_short=short,
        seen=seen_rule,
        source_run_id=users_manifest["run_id"],
        files=names,
        device=compute_on,
    )
