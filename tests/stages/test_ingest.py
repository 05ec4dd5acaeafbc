"""Ingest stage: validation errors, id mapping round-trip, duplicates, user blocks."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mf_dist.errors import InputError
from mf_dist.stages.ingest import ingest_ratings
from tests.support.data import write_input


def read_back(result) -> pd.DataFrame:
    """The ingested ratings with their original ids, from the files ingest wrote."""
    users = pq.read_table(result.users_path).to_pandas()
    items = pq.read_table(result.items_path).to_pandas()
    blocks = [pq.read_table(result.ratings_path(b)).to_pandas() for b in range(result.user_grid.n_blocks)]
    ratings = pd.concat(blocks, ignore_index=True)
    assert (users["index"].to_numpy() == np.arange(len(users))).all()
    assert (items["index"].to_numpy() == np.arange(len(items))).all()
    return pd.DataFrame(
        {
            "user_id": users["user_id"].to_numpy()[ratings["user"]],
            "item_id": items["item_id"].to_numpy()[ratings["item"]],
            "rating": ratings["rating"].to_numpy(),
        }
    )


def sorted_frame(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["user_id", "item_id"]).reset_index(drop=True)


@pytest.mark.parametrize("id_kind", ["integer", "string"])
@pytest.mark.parametrize("n_files", [1, 4])
def test_ids_round_trip(client, tmp_path, tiny_ratings, id_kind, n_files):
    """Original ids and ratings come back exactly through the index maps."""
    frame = tiny_ratings.copy()
    if id_kind == "string":
        frame["user_id"] = "user-é-" + frame["user_id"].astype(str)
        frame["item_id"] = "item/" + frame["item_id"].astype(str)
    source = write_input(frame, tmp_path / "in", n_files)
    result = ingest_ratings(client, str(source), tmp_path / "work", block_size=16)
    assert result.n_ratings == len(frame)
    assert result.n_users == frame.user_id.nunique()
    assert result.user_grid.n_blocks > 1
    back = read_back(result)
    expected = frame[["user_id", "item_id", "rating"]]
    pd.testing.assert_frame_equal(
        sorted_frame(back), sorted_frame(expected), check_dtype=False, check_index_type=False
    )
    assert result.global_mean == pytest.approx(frame.rating.mean(), rel=1e-6)


def test_blocks_hold_their_users_and_ids_are_deterministic(client, tmp_path, tiny_input):
    """Each block file holds only its user range; items are ordered by likes; reruns agree."""
    first = ingest_ratings(client, str(tiny_input), tmp_path / "a", block_size=16)
    second = ingest_ratings(client, str(tiny_input), tmp_path / "b", block_size=16)
    for block, start, stop in first.user_grid:
        users = pq.read_table(first.ratings_path(block))["user"].to_numpy()
        assert users.min() >= start and users.max() < stop
        assert pq.read_table(first.ratings_path(block)).equals(pq.read_table(second.ratings_path(block)))
    items = pq.read_table(first.items_path).to_pandas()
    assert (np.diff(items["n_likes"].to_numpy()) <= 0).all()
    assert pq.read_table(first.items_path).equals(pq.read_table(second.items_path))


def test_implicit_input_without_rating_column(client, tmp_path, tiny_ratings):
    """No rating column: every row is a 1.0 "like"; duplicates are summed by default."""
    frame = tiny_ratings[["user_id", "item_id"]]
    frame = pd.concat([frame, frame.iloc[:10]], ignore_index=True)
    source = write_input(frame, tmp_path / "in", 2)
    result = ingest_ratings(client, str(source), tmp_path / "work")
    assert result.implicit
    assert result.duplicates_policy == "sum"
    assert result.duplicates_resolved == 10
    back = read_back(result)
    assert sorted(back.rating.unique()) == [1.0, 2.0]
    assert (back.rating == 2.0).sum() == 10


def _with_duplicates(tiny_ratings: pd.DataFrame) -> pd.DataFrame:
    repeat = tiny_ratings.iloc[:5].copy()
    repeat["rating"] = np.float32(0.5)
    repeat["timestamp"] = tiny_ratings["timestamp"].iloc[:5] + 1
    return pd.concat([tiny_ratings, repeat], ignore_index=True)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("auto", lambda old: np.float32(0.5)),
        ("last", lambda old: np.float32(0.5)),
        ("sum", lambda old: old + np.float32(0.5)),
        ("mean", lambda old: (old + np.float32(0.5)) / 2),
    ],
)
def test_duplicate_policies(client, tmp_path, tiny_ratings, policy, expected):
    """Repeated (user, item) pairs resolve by the chosen policy."""
    frame = _with_duplicates(tiny_ratings)
    source = write_input(frame, tmp_path / "in", 2)
    result = ingest_ratings(client, str(source), tmp_path / "work", duplicates=policy)
    assert result.duplicates_resolved == 5
    back = read_back(result).set_index(["user_id", "item_id"])
    for row in tiny_ratings.iloc[:5].itertuples():
        assert back.loc[(row.user_id, row.item_id), "rating"] == pytest.approx(expected(row.rating))


def test_duplicates_error_names_both_rows(client, tmp_path, tiny_ratings):
    """With ratings but no timestamp, a repeated pair is an error naming both rows."""
    frame = _with_duplicates(tiny_ratings).drop(columns="timestamp")
    source = write_input(frame, tmp_path / "in", 1)
    pattern = (
        r"duplicate \(user, item\) pair \((\d+), (\d+)\): row (\d+) of .*part-00000\.parquet and row (\d+) of"
    )
    with pytest.raises(InputError, match=pattern) as error:
        ingest_ratings(client, str(source), tmp_path / "work")
    user, item, first, second = map(int, re.search(pattern, str(error.value)).groups())
    for row in (first, second):
        assert (frame.user_id.iloc[row], frame.item_id.iloc[row]) == (user, item)
    assert first != second
    assert "--duplicates" in str(error.value)
    assert not (tmp_path / "work" / "ingest").exists()


def _write(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


GOOD = {"user_id": [1, 2, 3], "item_id": [10, 11, 12], "rating": [4.0, 3.5, 5.0]}


def bad_input(case: str, root: Path) -> Path:
    """Write one bad input under ``root``; return the path to ingest."""
    data = dict(GOOD)
    if case == "missing item column":
        data.pop("item_id")
    elif case == "string ratings":
        data["rating"] = ["4", "3.5", "5"]
    elif case == "float ids":
        data["user_id"] = [1.0, 2.0, 3.0]
    elif case == "null ids":
        data["item_id"] = [10, None, 12]
    elif case == "nan rating":
        data["rating"] = [4.0, float("nan"), 5.0]
    elif case == "inf rating":
        data["rating"] = [4.0, 3.0, float("-inf")]
    elif case == "negative ids":
        data["user_id"] = [1, -2, 3]
    elif case == "empty directory":
        (root / "in").mkdir(parents=True)
        return root / "in"
    elif case == "corrupt file":
        _write(root / "in" / "a.parquet", pa.table(GOOD))
        (root / "in" / "b.parquet").write_bytes(b"PAR1 this is not parquet")
        return root / "in"
    elif case == "mixed id types":
        _write(root / "in" / "a.parquet", pa.table(GOOD))
        _write(root / "in" / "b.parquet", pa.table({**GOOD, "item_id": ["x", "y", "z"]}))
        return root / "in"
    elif case == "rating column in some files only":
        _write(root / "in" / "a.parquet", pa.table(GOOD))
        _write(root / "in" / "b.parquet", pa.table({k: v for k, v in GOOD.items() if k != "rating"}))
        return root / "in"
    elif case == "missing path":
        return root / "nowhere"
    return _write(root / "in" / "ratings.parquet", pa.table(data))


BAD_INPUTS = {
    # case: (pattern the message must match)
    "missing item column": r"ratings\.parquet, column 'item_id': missing id column",
    "string ratings": r"ratings\.parquet, column 'rating': must be numeric, found string",
    "float ids": r"ratings\.parquet, column 'user_id': ids must be integers or strings, found double",
    "null ids": r"ratings\.parquet, column 'item_id', row 1: null id",
    "nan rating": r"ratings\.parquet, column 'rating', row 1: ratings must be finite .*nan",
    "inf rating": r"ratings\.parquet, column 'rating', row 2: ratings must be finite .*-inf",
    "negative ids": r"ratings\.parquet, column 'user_id', row 1: ids must not be negative \(value: -2\)",
    "empty directory": r"in: no Parquet files found",
    "corrupt file": r"b\.parquet: not a readable Parquet file",
    "mixed id types": r"b\.parquet, column 'item_id': ids are string here but int64 in .*a\.parquet",
    "rating column in some files only": (
        r"b\.parquet, column 'rating': column is in .*a\.parquet but not here"
    ),
    "missing path": r"nowhere: input path does not exist",
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_rejected_with_file_and_column(client, tmp_path, case):
    """Each bad input raises InputError naming the file, column and row or value."""
    source = bad_input(case, tmp_path)
    with pytest.raises(InputError, match=BAD_INPUTS[case]):
        ingest_ratings(client, str(source), tmp_path / "work")
    assert not (tmp_path / "work" / "ingest").exists()


def test_input_may_be_a_glob_or_a_single_file(client, tmp_path, tiny_ratings):
    source = write_input(tiny_ratings, tmp_path / "in", 3)
    (source / "_SUCCESS").write_text("")
    by_glob = ingest_ratings(client, str(source / "part-0000[01].parquet"), tmp_path / "w1")
    assert len(by_glob.files) == 2
    single = ingest_ratings(client, str(source / "part-00002.parquet"), tmp_path / "w2")
    assert single.n_ratings == len(pq.read_table(source / "part-00002.parquet"))
    whole = ingest_ratings(client, str(source), tmp_path / "w3")
    assert whole.n_ratings == len(tiny_ratings)
