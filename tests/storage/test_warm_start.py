"""``--init-from`` matches rows by id value: reordered, added and removed ids (align_published_table)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mf_dist.storage.factor_files import FactorTable
from mf_dist.storage.warm_start import align_published_table
from tests.support.published import publish_items

PUBLISHED = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
# Today's ids in index order: published ones shuffled, 13, 16 and 18 gone, 30-34 new,
# spread over three blocks of five so that every block mixes matched and new rows.
TODAY = [17, 30, 12, 10, 31, 19, 15, 32, 33, 11, 14, 34]
REMOVED = {13, 16, 18}
RANK = 3


def as_ids(values, id_kind):
    return [f"item-{value}" for value in values] if id_kind == "string" else list(values)


def aligned_rows(tmp_path, id_kind, with_bias, seed, name="aligned"):
    """Align the published table to TODAY's id map; (vectors, bias or None, matched count)."""
    id_map = tmp_path / f"items-{id_kind}.parquet"
    ids = as_ids(TODAY, id_kind)
    pq.write_table(
        pa.table(
            {
                "index": pa.array(np.arange(len(ids), dtype=np.int32)),
                "item_id": pa.array(ids, type=pa.string() if id_kind == "string" else pa.int64()),
            }
        ),
        id_map,
    )
    layout = FactorTable(
        name="items",
        directory=str(tmp_path / name),
        n_rows=len(TODAY),
        block_size=5,
        rank=RANK,
        has_bias=with_bias,
    )
    aligned = align_published_table(str(tmp_path / "out"), layout, id_map, "item_id", seed, 1)
    assert aligned is not None
    table, matched = aligned
    blocks = [table.read_block(block) for block in range(table.grid.n_blocks)]
    vectors = np.concatenate([v for v, _ in blocks])
    bias = np.concatenate([b for _, b in blocks]) if with_bias else None
    return vectors, bias, matched


@pytest.mark.parametrize("with_bias", [False, True], ids=["vectors", "with-bias"])
@pytest.mark.parametrize("id_kind", ["int64", "string"])
def test_rows_follow_their_ids(client, tmp_path, id_kind, with_bias):
    # Every published row distinct and easy to recognise: id 1x has (1x, 1x + 0.25, 1x + 0.5).
    vectors = np.array([[value, value + 0.25, value + 0.5] for value in PUBLISHED], dtype=np.float32)
    bias = np.array([value / 100 for value in PUBLISHED], dtype=np.float32) if with_bias else None
    publish_items(client, tmp_path / "out", as_ids(PUBLISHED, id_kind), vectors, bias=bias, block_size=4)

    got, got_bias, matched = aligned_rows(tmp_path, id_kind, with_bias, seed=5)
    assert got.shape == (len(TODAY), RANK) and matched == len(set(TODAY) & set(PUBLISHED)) == 7
    published_rows = {tuple(row) for row in vectors.tolist()}
    for row, value in enumerate(TODAY):
        if value in PUBLISHED:
            expected = vectors[PUBLISHED.index(value)]
            np.testing.assert_array_equal(got[row], expected, err_msg=f"id {value} at row {row}")
            if with_bias:
                assert got_bias[row] == bias[PUBLISHED.index(value)]
        else:
            # A new id starts fresh: finite, small (the spread of the published vectors),
            # no published row, and no bias.
            assert np.isfinite(got[row]).all() and tuple(got[row].tolist()) not in published_rows
            assert np.abs(got[row]).max() < 10 * vectors.std()
            if with_bias:
                assert got_bias[row] == 0.0
    # Removed ids leave nothing behind.
    for value in REMOVED:
        assert not (got == vectors[PUBLISHED.index(value)]).all(axis=1).any()

    # Fresh rows come from the seed: the same seed gives the same table, another
    # seed changes the new rows only.
    again, _, _ = aligned_rows(tmp_path, id_kind, with_bias, seed=5, name="again")
    np.testing.assert_array_equal(again, got)
    reseeded, _, _ = aligned_rows(tmp_path, id_kind, with_bias, seed=6, name="reseeded")
    new = np.array([value not in PUBLISHED for value in TODAY])
    np.testing.assert_array_equal(reseeded[~new], got[~new])
    assert (reseeded[new] != got[new]).all(axis=1).all()


def test_a_table_the_run_did_not_publish_gives_none(client, tmp_path):
    publish_items(client, tmp_path / "out", PUBLISHED, np.ones((len(PUBLISHED), RANK), np.float32))
    layout = FactorTable(
        name="users", directory=str(tmp_path / "users"), n_rows=3, block_size=5, rank=RANK, has_bias=False
    )
    assert (
        align_published_table(str(tmp_path / "out"), layout, tmp_path / "none.parquet", "user_id", 0, 0)
        is None
    )
