"""Bad input and bad settings: one clear error each, and the published tables untouched.

Every case runs ``mf-dist run`` (in this process, on the session's Dask
cluster and Prefect server) against a copy of a real published output, and
checks the error's type and message (file, column, row or value) and that
not one byte of the tables, their ``LATEST`` files or their ``runs/``
directories changed. Merely unusual input (very long ids, any Unicode, one
user with every item) must run to the end.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer

from mf_dist import read_embeddings
from mf_dist.bench.synthetic import synthetic_ratings
from mf_dist.errors import ConfigError, InputError, OutputError, TrainingError
from tests.support.data import write_input
from tests.support.runs import cli, run_flags, table_files

# 4 users × 4 items, 8 ratings, no duplicates: valid until a case spoils it.
GOOD = {
    "user_id": [1, 1, 2, 2, 3, 3, 4, 4],
    "item_id": [10, 11, 11, 12, 12, 13, 13, 10],
    "rating": [4.0, 3.0, 5.0, 2.0, 1.0, 4.5, 3.5, 2.5],
    "timestamp": [100, 101, 102, 103, 104, 105, 106, 107],
}
DROP = object()


def parquet(directory: Path, name: str = "ratings.parquet", table: pa.Table | None = None, **columns) -> Path:
    """Write GOOD as ``directory/name``, ``columns`` replaced (``DROP`` drops one); return ``directory``."""
    if table is None:
        data = {key: value for key, value in {**GOOD, **columns}.items() if value is not DROP}
        table = pa.table(data)
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, directory / name)
    return directory


def truncated(directory: Path) -> Path:
    parquet(directory, "part.parquet")
    path = directory / "part.parquet"
    path.write_bytes(path.read_bytes()[:-40])
    return directory


def corrupt_pages(directory: Path) -> Path:
    """A file whose footer reads fine but whose item column's pages are garbage."""
    n = 400
    frame = pa.table({"user_id": np.arange(n) % 20, "item_id": np.arange(n) % 37, "rating": np.ones(n)})
    parquet(directory, table=frame)
    path = directory / "ratings.parquet"
    offset = pq.ParquetFile(path).metadata.row_group(0).column(1).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset + 2 : offset + 120] = bytes((7 * b + 13) % 256 for b in data[offset + 2 : offset + 120])
    path.write_bytes(bytes(data))
    return directory


def empty_files(directory: Path) -> Path:
    empty = pa.table({key: pa.array([], pa.array(values).type) for key, values in GOOD.items()})
    parquet(directory, "a.parquet", table=empty)
    return parquet(directory, "b.parquet", table=empty)


def two_schemas(directory: Path) -> Path:
    parquet(directory, "a.parquet")
    return parquet(directory, "b.parquet", item_id=[f"item-{i}" for i in GOOD["item_id"]])


def rating_in_one_file(directory: Path) -> Path:
    parquet(directory, "a.parquet")
    return parquet(directory, "b.parquet", rating=DROP)


def not_parquet(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "ratings.csv").write_text("user_id,item_id,rating\n1,10,4.0\n")
    (directory / "notes.txt").write_text("exported by hand\n")
    return directory


def duplicated(directory: Path, with_timestamp: bool = True) -> Path:
    data = {key: [*values, values[0]] for key, values in GOOD.items()}
    if not with_timestamp:
        data.pop("timestamp")
    return parquet(directory, table=pa.table(data))


def config_file(text: str) -> Callable[[Path], list[str | Path]]:
    def write(root: Path) -> list[str | Path]:
        path = root / "run.toml"
        path.write_text(text)
        return ["--config", path]

    return write


@dataclass(frozen=True)
class Case:
    """One bad input: what to write under the test's directory, and the error it must give.

    ``source(root)`` writes the input and returns it (default: GOOD as one
    file); ``flags(root)`` gives extra ``mf-dist run`` flags; ``output(root,
    published)`` picks the output (default: the copy of a published run).
    ``error`` None means the command-line parser itself refuses the flag.
    """

    error: type[Exception] | None
    message: str
    source: Callable[[Path], Path] = lambda root: parquet(root / "in")
    flags: Callable[[Path], list[str | Path]] = lambda root: []
    output: Callable[[Path, Path], Path] = lambda root, published: published


def blocked_output(root: Path, published: Path) -> Path:
    (root / "a-file").write_text("a file where the output's parent directory should be")
    return root / "a-file" / "out"


def file_output(root: Path, published: Path) -> Path:
    (root / "out.parquet").write_text("not a directory")
    return root / "out.parquet"


CASES = {
    # Columns and types, found in the files' footers before any work starts.
    "missing item column": Case(
        InputError,
        r"ratings\.parquet, column 'item_id': missing id column; the file has columns",
        source=lambda root: parquet(root / "in", item_id=DROP),
    ),
    "id column named by a flag is absent": Case(
        InputError,
        r"ratings\.parquet, column 'customer': missing id column.*--user-col",
        flags=lambda root: ["--user-col", "customer"],
    ),
    "string ratings": Case(
        InputError,
        r"ratings\.parquet, column 'rating': must be numeric, found string",
        source=lambda root: parquet(root / "in", rating=[str(r) for r in GOOD["rating"]]),
    ),
    "float ids": Case(
        InputError,
        r"ratings\.parquet, column 'user_id': ids must be integers or strings, found double",
        source=lambda root: parquet(root / "in", user_id=[float(u) for u in GOOD["user_id"]]),
    ),
    "files with different id types": Case(
        InputError,
        r"b\.parquet, column 'item_id': ids are string here but int64 in .*a\.parquet",
        source=lambda root: two_schemas(root / "in"),
    ),
    "a rating column in some files only": Case(
        InputError,
        r"b\.parquet, column 'rating': column is in .*a\.parquet but not here",
        source=lambda root: rating_in_one_file(root / "in"),
    ),
    "input path that does not exist": Case(
        InputError, r"nowhere: input path does not exist", source=lambda root: root / "nowhere"
    ),
    "empty directory": Case(
        InputError, r"in: no Parquet files found", source=lambda root: (root / "in").mkdir() or root / "in"
    ),
    "directory of non-Parquet files": Case(
        InputError,
        r"notes\.txt: not a Parquet file \(it does not begin with the Parquet magic bytes PAR1\)",
        source=lambda root: not_parquet(root / "in"),
    ),
    "truncated Parquet file": Case(
        InputError,
        r"part\.parquet: not a readable Parquet file \(truncated or corrupt\?\)",
        source=lambda root: truncated(root / "in"),
    ),
    # Values, found by the workers' scan of every row.
    "corrupt data pages behind a good footer": Case(
        InputError,
        r"ratings\.parquet: cannot read the rows \(corrupt data pages\?\)",
        source=lambda root: corrupt_pages(root / "in"),
    ),
    "null ids": Case(
        InputError,
        r"ratings\.parquet, column 'item_id', row 2: null id \(1 rows\)",
        source=lambda root: parquet(root / "in", item_id=[10, 11, None, 12, 12, 13, 13, 10]),
    ),
    "NaN rating": Case(
        InputError,
        r"ratings\.parquet, column 'rating', row 1: ratings must be finite .*\(value: nan\)",
        source=lambda root: parquet(root / "in", rating=[4.0, float("nan"), 5, 2, 1, 4.5, 3.5, 2.5]),
    ),
    "+inf rating": Case(
        InputError,
        r"ratings\.parquet, column 'rating', row 5: ratings must be finite .*\(value: inf\)",
        source=lambda root: parquet(root / "in", rating=[4.0, 3, 5, 2, 1, float("inf"), 3.5, 2.5]),
    ),
    "-inf rating": Case(
        InputError,
        r"ratings\.parquet, column 'rating', row 7: ratings must be finite .*\(value: -inf\)",
        source=lambda root: parquet(root / "in", rating=[4.0, 3, 5, 2, 1, 4.5, 3.5, float("-inf")]),
    ),
    "rating above --rating-max": Case(
        InputError,
        r"ratings\.parquet, column 'rating', row 3: rating outside the configured range \[1\.0, 5\.0\] "
        r"\(1 rows are\).*rating_min/rating_max \(value: 7\.0\)",
        source=lambda root: parquet(root / "in", rating=[4.0, 3, 5, 7, 1, 4.5, 3.5, 2.5]),
        flags=lambda root: ["--rating-min", "1", "--rating-max", "5"],
    ),
    "rating below rating_min of a config file": Case(
        InputError,
        r"ratings\.parquet, column 'rating', row 4: rating outside the configured range \[1\.0, inf\] "
        r".*\(value: 0\.5\)",
        source=lambda root: parquet(root / "in", rating=[4.0, 3, 5, 2, 0.5, 4.5, 3.5, 2.5]),
        flags=config_file("rating_min = 1.0\n"),
    ),
    "negative ids": Case(
        InputError,
        r"ratings\.parquet, column 'user_id', row 1: ids must not be negative \(value: -1\)",
        source=lambda root: parquet(root / "in", user_id=[1, -1, 2, 2, 3, 3, 4, 4]),
    ),
    "ids beyond int64": Case(
        InputError,
        r"ratings\.parquet, column 'item_id', row 6: ids must fit in a signed 64-bit integer "
        r".*\(value: 9223372036854775808\)",
        source=lambda root: parquet(
            root / "in",
            item_id=pa.array([10, 11, 11, 12, 12, 13, 2**63, 10], pa.uint64()),
        ),
    ),
    "null timestamp": Case(
        InputError,
        r"ratings\.parquet, column 'timestamp', row 1: null timestamp",
        source=lambda root: parquet(root / "in", timestamp=[100, None, 102, 103, 104, 105, 106, 107]),
    ),
    "files with no rows": Case(
        InputError,
        r"in: the input has no rows: 2 Parquet file\(s\), all empty",
        source=lambda root: empty_files(root / "in"),
    ),
    "no rating reaches --like-threshold": Case(
        InputError,
        r"ratings\.parquet, column 'rating': no rating reaches the like threshold 9\.0 \(the highest is 5\)",
        flags=lambda root: ["--like-threshold", "9"],
    ),
    "a single user": Case(
        InputError,
        r"ratings\.parquet, column 'user_id': every rating has the same user.*\(value: 7\)",
        source=lambda root: parquet(root / "in", user_id=[7] * 8, item_id=[10, 11, 12, 13, 14, 15, 16, 17]),
    ),
    "a single item": Case(
        InputError,
        r"ratings\.parquet, column 'item_id': every rating has the same item.*\(value: 'only'\)",
        source=lambda root: parquet(root / "in", user_id=list(range(8)), item_id=["only"] * 8),
    ),
    # Duplicate (user, item) pairs: refused by the 'error' policy, and by every
    # policy that cannot decide without a timestamp ('sum' and 'mean' resolve
    # them; tests/stages/test_ingest.py checks their values).
    "duplicate pair, --duplicates error": Case(
        InputError,
        r"ratings\.parquet, column 'item_id', row 8: duplicate \(user, item\) pair \(1, 10\): "
        r"row 0 of .*ratings\.parquet and row 8 of .*ratings\.parquet; 1 duplicate rows in all\. "
        r"Choose a policy with --duplicates",
        source=lambda root: duplicated(root / "in"),
        flags=lambda root: ["--duplicates", "error"],
    ),
    "duplicate pair, --duplicates auto without a timestamp": Case(
        InputError,
        r"duplicate \(user, item\) pair \(1, 10\)",
        source=lambda root: duplicated(root / "in", with_timestamp=False),
    ),
    "duplicate pair, --duplicates last without a timestamp": Case(
        InputError,
        r"column 'timestamp': duplicates='last' needs a timestamp column",
        source=lambda root: duplicated(root / "in", with_timestamp=False),
        flags=lambda root: ["--duplicates", "last"],
    ),
    # Settings that do not fit the data, found once it is read.
    "rank larger than the number of items": Case(
        ConfigError,
        r"rank 9 is larger than the number of items \(4\); lower --rank",
        flags=lambda root: ["--rank", "9"],
    ),
    "explicit model without a rating column": Case(
        ConfigError,
        r"the explicit model needs ratings, but the input files have no rating column",
        source=lambda root: parquet(root / "in", rating=DROP),
        flags=lambda root: ["--model", "explicit"],
    ),
    # Where the tables go.
    "output below a regular file": Case(
        OutputError,
        r"cannot write to .*a-file/out: Not a directory; choose an --output",
        output=blocked_output,
    ),
    "output that is a regular file": Case(
        OutputError, r"out\.parquet is a file, not a directory", output=file_output
    ),
    "output inside the input": Case(
        ConfigError,
        r"output '.*in/tables' is inside the input directory '.*in', whose files are all read as ratings",
        output=lambda root, published: root / "in" / "tables",
    ),
    "work directory inside the input": Case(
        ConfigError,
        r"work_dir '.*in/work' is inside the input directory",
        flags=lambda root: ["--work-dir", root / "in" / "work"],
    ),
    # Configuration files and flags.
    "config file with an unknown key": Case(
        ConfigError,
        r"invalid configuration in .*run\.toml: unknown key 'ranks'",
        flags=config_file("ranks = 8\n"),
    ),
    "config file with a wrong type": Case(
        ConfigError,
        r"invalid configuration in .*run\.toml: seed: Input should be a valid integer.*'zero'",
        flags=config_file('seed = "zero"\n'),
    ),
    "rating_min above rating_max": Case(
        ConfigError,
        r"rating_min 5\.0 is above rating_max 1\.0",
        flags=lambda root: ["--rating-min", "5", "--rating-max", "1"],
    ),
    "flag out of range: --rank -3": Case(
        ConfigError,
        r"rank: Input should be greater than or equal to 1 \(got -3\)",
        flags=lambda root: ["--rank", "-3"],
    ),
    "flag with a nonsense choice: --model svd": Case(
        None, r"Invalid value for '--model': .*'svd' is not one of", flags=lambda root: ["--model", "svd"]
    ),
    "flag with a nonsense number: --epochs many": Case(
        None,
        r"Invalid value for '--epochs': .*valid integer",
        flags=lambda root: ["--epochs", "many"],
    ),
    # A numerical fault: the loss climbs by orders of magnitude.
    "learning rate that diverges": Case(
        TrainingError,
        r"the cooccurrence loss diverged at epoch \d+: it rose from .* to .*; "
        r"lower --learning-rate \(now 10\.0\)",
        source=lambda root: write_input(
            synthetic_ratings(300, n_users=20, n_items=30, seed=7), root / "in", 1
        ),
        flags=lambda root: ["--model", "cooccurrence", "--learning-rate", "10", "--epochs", "4"],
    ),
}


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 20


# The default run (CI) checks one case of each kind; those that get as far as
# the flow cost seconds each on 2 cores, so the rest run in the slow tier.
DEFAULT_TIER = {
    "missing item column",
    "string ratings",
    "input path that does not exist",
    "corrupt data pages behind a good footer",
    "null ids",
    "NaN rating",
    "rating above --rating-max",
    "no rating reaches --like-threshold",
    "duplicate pair, --duplicates error",
    "rank larger than the number of items",
    "output inside the input",
    "config file with an unknown key",
    "flag with a nonsense choice: --model svd",
    "learning rate that diverges",
}


def test_the_default_tier_names_real_cases():
    assert set(CASES) >= DEFAULT_TIER


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=() if name in DEFAULT_TIER else pytest.mark.slow) for name in CASES]
)
def test_bad_input_is_refused_and_leaves_the_tables_alone(client, tmp_path, output_copy, name):
    case = CASES[name]
    before = table_files(output_copy)
    output = case.output(tmp_path, output_copy)
    error = cli(*run_flags(case.source(tmp_path), output, client.scheduler.address, *case.flags(tmp_path)))

    expected = case.error or typer.BadParameter  # None: the parser refuses the flag, before any code of ours
    assert isinstance(error, expected), f"expected {expected.__name__}, got {error!r}"
    text = error.format_message() if isinstance(error, typer.BadParameter) else str(error)
    assert re.search(case.message, text), text
    assert table_files(output_copy) == before


# Visibly equal strings in two normal forms stay two ids; so do ids that differ
# only in invisible or white-space characters.
UNICODE_NAMES = [
    unicodedata.normalize("NFC", "café"),
    unicodedata.normalize("NFD", "café"),
    "日本語のアイテム",
    "🎬🍿",
    "עברית",
    "Ελληνικά",
    " ",
    "tab\there",
    "line\nbreak",
    "zero\u200bwidth",
]


def long_ids(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(
        user_id=[f"user-{u}-".ljust(100, "u") for u in frame.user_id],
        item_id=[f"item-{i}-".ljust(100, "i") for i in frame.item_id],
    )


def unicode_ids(frame: pd.DataFrame) -> pd.DataFrame:
    items = {
        item: UNICODE_NAMES[n] if n < len(UNICODE_NAMES) else f"{UNICODE_NAMES[n % 10]}·{n}"
        for n, item in enumerate(sorted(frame.item_id.unique()))
    }
    return frame.assign(user_id=[f"用户{u}" for u in frame.user_id], item_id=frame.item_id.map(items))


def one_huge_user(frame: pd.DataFrame) -> pd.DataFrame:
    items = np.sort(frame.item_id.unique())
    whale = pd.DataFrame(
        {
            "user_id": np.full(len(items), 10**12, dtype=np.int64),
            "item_id": items,
            "rating": np.float32(3.0),
            "timestamp": np.arange(len(items), dtype=np.int64),
        }
    )
    return pd.concat([frame, whale], ignore_index=True)


UNUSUAL = {
    "100-character string ids": long_ids,
    "Unicode ids": unicode_ids,
    "one user with every item": one_huge_user,
}


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=() if name == "Unicode ids" else pytest.mark.slow) for name in UNUSUAL]
)
def test_unusual_input_runs_to_the_end(client, tmp_path, tiny_ratings, name):
    frame = UNUSUAL[name](tiny_ratings)
    source = write_input(frame, tmp_path / "in", 2)
    output = tmp_path / "out"
    assert cli(*run_flags(source, output, client.scheduler.address, "--model", "explicit")) is None
    for table, column in (("items", "item_id"), ("users", "user_id")):
        published = read_embeddings(output / table)
        assert sorted(published.ids.tolist()) == sorted(frame[column].unique().tolist())
        assert np.isfinite(published.vectors).all()
