"""Ingest stage: input Parquet → validated, indexed ratings partitioned by user block.

Three passes over the data, all on the Dask workers:

1. scan every input file: validate values, count ratings per user and item;
2. map original ids to contiguous int32 indices and write each row to the
   staging folder of its user block;
3. per user block: sort, resolve duplicate (user, item) pairs by the policy,
   and write ``ratings/block-P.parquet``.

Users are indexed in order of their id; items by decreasing number of likes
(ties by id), so that the popular items, whose co-occurrence is dense, share
the first item blocks and the long tail's sparse tiles stay sparse.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
from distributed import Client, wait

from mf_dist.blocks import BlockGrid
from mf_dist.errors import InputError
from mf_dist.settings import DuplicatePolicy
from mf_dist.storage.filesystems import common_prefix, is_remote
from mf_dist.storage.ingested import HOLDOUT_DIR, IngestResult, liked_mask
from mf_dist.storage.input_files import InputColumns, check_schemas, input_fingerprint, list_input_files
from mf_dist.storage.schema import INGEST_DIR, RATINGS_SCHEMA, ratings_block_name
from mf_dist.storage.store import (
    delete_prefix,
    exists,
    join,
    list_names,
    make_dirs,
    read_table,
    write_bytes,
    write_table,
)

logger = logging.getLogger(__name__)

# The largest id the pipeline keeps (ids are int64 from ingest on).
INT64_MAX = np.iinfo(np.int64).max


@dataclass
class PartitionScan:
    """Counts from one input file, or the first problem found in it."""

    problem: InputError | None = None
    n_rows: int = 0
    user_counts: pd.Series = field(default_factory=lambda: pd.Series(dtype="int64"))
    item_counts: pd.Series = field(default_factory=lambda: pd.Series(dtype="int64"))
    item_likes: pd.Series = field(default_factory=lambda: pd.Series(dtype="int64"))
    highest_rating: float = -np.inf


def _first_bad_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _normalised_ids(values: pd.Series) -> pd.Series:
    if pd.api.types.is_integer_dtype(values.dtype):
        return values.astype("int64")
    return values.astype("str")


def _ratings_of(frame: pd.DataFrame, columns: InputColumns) -> np.ndarray:
    if columns.rating is None:
        return np.ones(len(frame), dtype=np.float64)
    return frame[columns.rating].to_numpy(dtype=np.float64, na_value=np.nan)


def scan_partition(
    frame: pd.DataFrame,
    file: str,
    columns: InputColumns,
    like_threshold: float | None,
    rating_range: tuple[float | None, float | None] = (None, None),
) -> PartitionScan:
    """Validate one input file's rows and count ratings and likes per id.

    ``rating_range`` is the configured (``rating_min``, ``rating_max``); either may be None.
    """
    for column in (columns.user, columns.item):
        nulls = frame[column].isna().to_numpy()
        if nulls.any():
            row = _first_bad_row(nulls)
            return PartitionScan(
                problem=InputError(f"null id ({int(nulls.sum())} rows)", file=file, column=column, row=row)
            )
        values = frame[column]
        if pd.api.types.is_integer_dtype(values.dtype):
            negative = (values < 0).to_numpy()
            if negative.any():
                row = _first_bad_row(negative)
                return PartitionScan(
                    problem=InputError(
                        "ids must not be negative",
                        file=file,
                        column=column,
                        row=row,
                        value=int(values.iloc[row]),
                    )
                )
            # uint64 ids above 2**63 - 1 would wrap around to negative int64 ids.
            overflowing = (values > INT64_MAX).to_numpy() if values.dtype == np.uint64 else None
            if overflowing is not None and overflowing.any():
                row = _first_bad_row(overflowing)
                return PartitionScan(
                    problem=InputError(
                        f"ids must fit in a signed 64-bit integer (at most {INT64_MAX})",
                        file=file,
                        column=column,
                        row=row,
                        value=int(values.iloc[row]),
                    )
                )
    ratings = _ratings_of(frame, columns)
    bad = ~np.isfinite(ratings)
    if bad.any():
        row = _first_bad_row(bad)
        return PartitionScan(
            problem=InputError(
                f"ratings must be finite numbers ({int(bad.sum())} rows are not)",
                file=file,
                column=columns.rating,
                row=row,
                value=float(ratings[row]),
            )
        )
    low, high = rating_range
    outside = np.zeros(len(ratings), dtype=bool)
    if low is not None:
        outside |= ratings < low
    if high is not None:
        outside |= ratings > high
    if outside.any():
        row = _first_bad_row(outside)
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        return PartitionScan(
            problem=InputError(
                f"rating outside the configured range {bounds} ({int(outside.sum())} rows are); "
                "fix the data or change rating_min/rating_max",
                file=file,
                column=columns.rating,
                row=row,
                value=float(ratings[row]),
            )
        )
    if columns.timestamp is not None:
        nulls = frame[columns.timestamp].isna().to_numpy()
        if nulls.any():
            return PartitionScan(
                problem=InputError(
                    "null timestamp", file=file, column=columns.timestamp, row=_first_bad_row(nulls)
                )
            )
    users = _normalised_ids(frame[columns.user])
    items = _normalised_ids(frame[columns.item])
    liked = liked_mask(ratings, like_threshold)
    return PartitionScan(
        n_rows=len(frame),
        user_counts=users.value_counts(sort=False),
        item_counts=items.value_counts(sort=False),
        item_likes=items[liked].value_counts(sort=False),
        highest_rating=float(ratings.max()) if len(ratings) else -np.inf,
    )


def index_partition(
    frame: pd.DataFrame,
    source: int,
    columns: InputColumns,
    user_index: pd.Index,
    item_index: pd.Index,
    block_size: int,
    staging: str,
) -> list[int]:
    """Map one file's ids to indices and append its rows to their user blocks' staging folders.

    Returns the user blocks this file wrote to.
    """
    users = user_index.get_indexer(_normalised_ids(frame[columns.user])).astype(np.int32)
    items = item_index.get_indexer(_normalised_ids(frame[columns.item])).astype(np.int32)
    table = {
        "user": users,
        "item": items,
        "rating": _ratings_of(frame, columns).astype(np.float32),
        "source": np.full(len(frame), source, dtype=np.int32),
        "row": np.arange(len(frame), dtype=np.int64),
    }
    if columns.timestamp is not None:
        table["timestamp"] = _timestamps_of(frame[columns.timestamp])
    staged = pd.DataFrame(table)
    blocks = users // block_size
    written = []
    for block in np.unique(blocks):
        rows = staged[blocks == block]
        folder = join(staging, f"block-{int(block):05d}")
        make_dirs(folder)
        write_table(
            pa.Table.from_pandas(rows, preserve_index=False), join(folder, f"part-{source:06d}.parquet")
        )
        written.append(int(block))
    return written


def _timestamps_of(values: pd.Series) -> np.ndarray:
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        return values.astype("datetime64[ns]").astype("int64").to_numpy()
    return values.to_numpy(dtype=np.float64)


@dataclass(frozen=True)
class HoldoutSplit:
    """A reproducible random share of the ratings kept out of training."""

    fraction: float
    seed: int

    def selects(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Whether each (user, item) index pair is held out: a hash, so independent of blocks and order."""
        key = users.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + items.astype(np.uint64)
        key ^= np.uint64(self.seed) * np.uint64(0xBF58476D1CE4E5B9)
        # splitmix64's finaliser: a well-mixed 64-bit value from a structured key.
        key ^= key >> np.uint64(30)
        key *= np.uint64(0xBF58476D1CE4E5B9)
        key ^= key >> np.uint64(27)
        key *= np.uint64(0x94D049BB133111EB)
        key ^= key >> np.uint64(31)
        return (key >> np.uint64(11)).astype(np.float64) / float(1 << 53) < self.fraction


@dataclass
class BlockStats:
    n_ratings: int
    n_held_out: int
    n_likes: int
    duplicates_resolved: int
    rating_sum: float
    user_counts: np.ndarray
    user_like_counts: np.ndarray
    item_ids: np.ndarray
    item_counts: np.ndarray
    item_like_counts: np.ndarray


def finalise_block(
    block: int,
    staging: str,
    output: str,
    policy: DuplicatePolicy,
    like_threshold: float | None,
    block_size: int,
    n_users: int,
    user_index: pd.Index,
    item_index: pd.Index,
    files: list[str],
    columns: InputColumns,
    holdout: HoldoutSplit | None = None,
) -> BlockStats:
    """Sort one user block, resolve duplicate pairs by ``policy``, hold out a share, write it, count it."""
    folder = join(staging, f"block-{block:05d}")
    parts = [join(folder, name) for name in list_names(folder) if name.endswith(".parquet")]
    table = pa.concat_tables([read_table(p) for p in parts]).to_pandas()
    user = table["user"].to_numpy()
    item = table["item"].to_numpy()
    rating = table["rating"].to_numpy()
    source = table["source"].to_numpy()
    row = table["row"].to_numpy()
    has_time = "timestamp" in table
    # Sorting by (user, item, timestamp, file, row) puts each duplicate group
    # together with its latest occurrence last, independent of read order.
    keys = [row, source] + ([table["timestamp"].to_numpy()] if has_time else []) + [item, user]
    order = np.lexsort(keys)
    user, item, rating, source, row = user[order], item[order], rating[order], source[order], row[order]

    starts = np.flatnonzero(np.r_[True, (user[1:] != user[:-1]) | (item[1:] != item[:-1])])
    n_duplicates = len(user) - len(starts)
    if n_duplicates:
        if policy == "error":
            first = int(np.flatnonzero(np.diff(starts, append=len(user)) > 1)[0])
            a, b = starts[first], starts[first] + 1
            raise InputError(
                f"duplicate (user, item) pair ({_plain(user_index[user[a]])!r}, "
                f"{_plain(item_index[item[a]])!r}): "
                f"row {row[a]} of {files[source[a]]} and row {row[b]} of {files[source[b]]}; "
                f"{n_duplicates} duplicate rows in all. Choose a policy with --duplicates "
                "(last, sum, mean)",
                file=files[source[b]],
                column=columns.item,
                row=int(row[b]),
            )
        if policy == "last":
            ends = np.r_[starts[1:], len(user)] - 1
            user, item, rating = user[ends], item[ends], rating[ends]
        else:
            sums = np.add.reduceat(rating.astype(np.float64), starts)
            if policy == "mean":
                sums /= np.diff(starts, append=len(user))
            user, item, rating = user[starts], item[starts], sums.astype(np.float32)

    n_held_out = 0
    if holdout is not None and holdout.fraction > 0:
        held = holdout.selects(user, item)
        held_table = pa.Table.from_arrays(
            [
                pa.array(user[held], pa.int32()),
                pa.array(item[held], pa.int32()),
                pa.array(rating[held], pa.float32()),
            ],
            schema=RATINGS_SCHEMA,
        )
        write_table(held_table, join(output.rsplit("/", 1)[0], HOLDOUT_DIR, ratings_block_name(block)))
        n_held_out = int(held.sum())
        user, item, rating = user[~held], item[~held], rating[~held]

    out = pa.Table.from_arrays(
        [pa.array(user, pa.int32()), pa.array(item, pa.int32()), pa.array(rating, pa.float32())],
        schema=RATINGS_SCHEMA,
    )
    write_table(out, join(output, ratings_block_name(block)))

    liked = liked_mask(rating, like_threshold)
    start = block * block_size
    stop = min(start + block_size, n_users)
    item_ids, item_counts = np.unique(item, return_counts=True)
    liked_counts = np.bincount(np.searchsorted(item_ids, item[liked]), minlength=len(item_ids))
    return BlockStats(
        n_ratings=len(user),
        n_held_out=n_held_out,
        n_likes=int(liked.sum()),
        duplicates_resolved=n_duplicates,
        rating_sum=float(rating.astype(np.float64).sum()),
        user_counts=np.bincount(user - start, minlength=stop - start),
        user_like_counts=np.bincount(user[liked] - start, minlength=stop - start),
        item_ids=item_ids,
        item_counts=item_counts,
        item_like_counts=liked_counts,
    )


def _read_error(error: BaseException, file: str) -> BaseException:
    """The error to raise for a file whose rows could not be read.

    Arrow's decoding errors (a footer that reads but corrupt pages behind it)
    become an :class:`InputError` naming the file. Errors with an errno (an
    I/O error of the filesystem, a file deleted meanwhile) may pass, so they
    stay as they are and the stage can be retried.
    """
    decoding = isinstance(error, pa.ArrowException) or (isinstance(error, OSError) and error.errno is None)
    if decoding and not isinstance(error, InputError):
        return InputError(f"cannot read the rows (corrupt data pages?): {error}", file=file)
    return error


def _plain(value: object) -> object:
    """A numpy scalar as the Python value it holds, for readable messages."""
    return value.item() if isinstance(value, np.generic) else value


def resolve_duplicate_policy(
    policy: DuplicatePolicy, columns: InputColumns, timestamp_col: str | None = None
) -> DuplicatePolicy:
    """The concrete policy for ``auto``, checked against the columns there are.

    ``timestamp_col`` is the configured timestamp column, named when it is missing.
    """
    if policy == "auto":
        if columns.timestamp is not None:
            return "last"
        return "sum" if columns.rating is None else "error"
    if policy == "last" and columns.timestamp is None:
        raise InputError(
            "duplicates='last' needs a timestamp column to tell which rating is the last; "
            "set --timestamp-col or choose sum, mean or error",
            column=columns.timestamp or timestamp_col,
        )
    return policy


def ingest_ratings(
    client: Client,
    input_path: str,
    work_dir: str | Path,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    rating_col: str = "rating",
    timestamp_col: str = "timestamp",
    like_threshold: float | None = None,
    duplicates: DuplicatePolicy = "auto",
    block_size: int = 4096,
    holdout: float = 0.0,
    seed: int = 0,
    rating_min: float | None = None,
    rating_max: float | None = None,
    storage_options: dict[str, Any] | None = None,
) -> IngestResult:
    """Run the ingest stage on the cluster of ``client``; see the module docstring.

    ``holdout`` > 0 sets that share of the (deduplicated) ratings aside for
    evaluation, chosen by a hash of (user, item, seed), under ``holdout/``;
    every later stage trains on the rest.

    Raises :class:`InputError` naming file, column and row for bad input
    (including a rating outside [``rating_min``, ``rating_max``], no rating
    reaching ``like_threshold``, or a single user or item); in that case
    nothing is left in the work directory's ingest folder.
    """
    files = list_input_files(input_path, storage_options)
    columns = check_schemas(
        files,
        user_col=user_col,
        item_col=item_col,
        rating_col=rating_col,
        timestamp_col=timestamp_col,
        storage_options=storage_options,
    )
    policy = resolve_duplicate_policy(duplicates, columns, timestamp_col)
    directory = join(str(work_dir), INGEST_DIR)
    if exists(directory):
        delete_prefix(directory)
    staging = join(directory, "_staging")
    ratings_dir = join(directory, "ratings")
    make_dirs(ratings_dir)
    make_dirs(join(directory, HOLDOUT_DIR))
    split = HoldoutSplit(holdout, seed) if holdout > 0 else None
    try:
        result = _ingest(
            client,
            files,
            columns,
            policy,
            directory,
            staging,
            ratings_dir,
            like_threshold,
            block_size,
            split,
            rating_range=(rating_min, rating_max),
            storage_options=storage_options,
        )
    except BaseException:
        delete_prefix(directory)
        raise
    finally:
        delete_prefix(staging)
    return result


def _ingest(
    client: Client,
    files: list[str],
    columns: InputColumns,
    policy: DuplicatePolicy,
    directory: str,
    staging: str,
    ratings_dir: str,
    like_threshold: float | None,
    block_size: int,
    holdout: HoldoutSplit | None = None,
    rating_range: tuple[float | None, float | None] = (None, None),
    storage_options: dict[str, Any] | None = None,
) -> IngestResult:
    # On an object store the workers open the files themselves, through fsspec,
    # with these options and the credentials of their own environment.
    remote = is_remote(files[0])
    frame = dd.read_parquet(
        files,
        columns=columns.names,
        split_row_groups=False,
        **({"storage_options": dict(storage_options or {})} if remote else {}),
    )
    partitions = frame.to_delayed()
    if len(partitions) != len(files):
        raise RuntimeError(f"expected one partition per file, got {len(partitions)} for {len(files)}")

    scan_futures = client.compute(
        [
            dask.delayed(scan_partition)(part, file, columns, like_threshold, rating_range)
            for part, file in zip(partitions, files, strict=True)
        ]
    )
    wait(scan_futures)
    for future, file in zip(scan_futures, files, strict=True):
        if future.status == "error":
            raise _read_error(future.exception(), file)
    scans: list[PartitionScan] = client.gather(scan_futures)
    for scan in scans:
        if scan.problem is not None:
            raise scan.problem
    source = common_prefix(files) if remote else os.path.commonpath(files)
    if sum(scan.n_rows for scan in scans) == 0:
        raise InputError(f"the input has no rows: {len(files)} Parquet file(s), all empty", file=source)
    if like_threshold is not None and sum(int(scan.item_likes.sum()) for scan in scans) == 0:
        highest = max(scan.highest_rating for scan in scans)
        raise InputError(
            f"no rating reaches the like threshold {like_threshold} (the highest is {highest:g}), so "
            "nothing counts as liked; lower --like-threshold",
            file=source,
            column=columns.rating,
        )

    user_index = pd.Index(
        pd.concat([s.user_counts for s in scans]).groupby(level=0).sum().index.sort_values()
    )
    item_totals = pd.DataFrame(
        {
            "likes": pd.concat([s.item_likes for s in scans]).groupby(level=0).sum(),
            "ratings": pd.concat([s.item_counts for s in scans]).groupby(level=0).sum(),
        }
    ).fillna(0)
    item_totals.index.name = "id"
    item_order = item_totals.reset_index().sort_values(
        ["likes", "ratings", "id"], ascending=[False, False, True], kind="stable"
    )
    item_index = pd.Index(item_order["id"].to_numpy())
    for side, index, column in (("user", user_index, columns.user), ("item", item_index, columns.item)):
        if len(index) < 2:
            raise InputError(
                f"every rating has the same {side}, so there is nothing to factorize; "
                f"the input needs at least two {side}s",
                file=source,
                column=column,
                value=_plain(index[0]),
            )
    logger.info("ingest: %d files, %d users, %d items", len(files), len(user_index), len(item_index))

    [user_index_future, item_index_future] = client.scatter([user_index, item_index], broadcast=True)
    client.gather(
        client.compute(
            [
                dask.delayed(index_partition)(
                    part, source, columns, user_index_future, item_index_future, block_size, str(staging)
                )
                for source, part in enumerate(partitions)
            ]
        )
    )

    user_grid = BlockGrid(len(user_index), block_size)
    stats: list[BlockStats] = client.gather(
        [
            client.submit(
                finalise_block,
                block,
                str(staging),
                str(ratings_dir),
                policy,
                like_threshold,
                block_size,
                len(user_index),
                user_index_future,
                item_index_future,
                files,
                columns,
                holdout,
            )
            for block in range(user_grid.n_blocks)
        ]
    )

    n_items = len(item_index)
    item_ratings = np.zeros(n_items, dtype=np.int64)
    item_likes = np.zeros(n_items, dtype=np.int64)
    for block in stats:
        np.add.at(item_ratings, block.item_ids, block.item_counts)
        np.add.at(item_likes, block.item_ids, block.item_like_counts)
    _write_id_map(
        join(directory, "users.parquet"),
        "user_id",
        user_index,
        columns.user_id_type,
        {
            "n_ratings": np.concatenate([s.user_counts for s in stats]),
            "n_likes": np.concatenate([s.user_like_counts for s in stats]),
        },
    )
    _write_id_map(
        join(directory, "items.parquet"),
        "item_id",
        item_index,
        columns.item_id_type,
        {"n_ratings": item_ratings, "n_likes": item_likes},
    )

    n_ratings = sum(s.n_ratings for s in stats)
    result = IngestResult(
        directory=directory,
        files=files,
        fingerprint=input_fingerprint(files, storage_options),
        n_users=len(user_index),
        n_items=n_items,
        n_ratings=n_ratings,
        n_held_out=sum(s.n_held_out for s in stats),
        holdout=holdout.fraction if holdout else 0.0,
        n_likes=sum(s.n_likes for s in stats),
        block_size=block_size,
        implicit=columns.rating is None,
        like_threshold=like_threshold,
        global_mean=sum(s.rating_sum for s in stats) / n_ratings,
        duplicates_policy=policy,
        duplicates_resolved=sum(s.duplicates_resolved for s in stats),
        user_column=columns.user,
        item_column=columns.item,
        user_id_type=str(columns.user_id_type),
        item_id_type=str(columns.item_id_type),
    )
    write_bytes(join(directory, "summary.json"), result.model_dump_json(indent=2).encode())
    return result


def _write_id_map(
    path: str, id_name: str, ids: pd.Index, id_type: pa.DataType, counts: dict[str, np.ndarray]
) -> None:
    columns = {
        "index": pa.array(np.arange(len(ids), dtype=np.int32)),
        id_name: pa.array(ids.to_numpy(), type=id_type),
    }
    columns.update({name: pa.array(values.astype(np.int64)) for name, values in counts.items()})
    write_table(pa.table(columns), path)
