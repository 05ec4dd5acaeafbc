"""``mf_dist.fold_in`` against the trainers' own ALS user half-step on the same data."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from mf_dist import fold_in
from mf_dist.blocks import RowBlock
from mf_dist.errors import ConfigError, InputError
from mf_dist.settings import TrainSettings
from mf_dist.trainers import explicit_als, implicit
from mf_dist.trainers.ratings_sides import SideEntries
from tests.support.published import publish_items
from tests.support.recommend import publish_user_item_run

N_ITEMS, RANK = 19, 4


def new_ratings(rng, item_ids, users=("b", "a", "c", "d"), per_user=5) -> pd.DataFrame:
    rows = [
        (user, item_ids[int(item)], float(rng.integers(1, 6)))
        for user in users
        for item in rng.choice(len(item_ids), size=per_user, replace=False)
    ]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating"])


def entries(frame: pd.DataFrame, item_ids: list) -> tuple[SideEntries, list]:
    """The frame as the trainers see a user block: local user rows sorted, item rows, values."""
    users = sorted(frame.user_id.unique())
    position = {item: row for row, item in enumerate(item_ids)}
    local = frame.assign(
        row=frame.user_id.map({user: row for row, user in enumerate(users)}),
        col=frame.item_id.map(position),
    ).sort_values(["row", "col"])
    return (
        SideEntries(
            rows=torch.tensor(local.row.to_numpy(), dtype=torch.int64),
            cols=torch.tensor(local.col.to_numpy(), dtype=torch.int64),
            values=torch.tensor(local.rating.to_numpy(), dtype=torch.float32),
            n_rows=len(users),
        ),
        users,
    )


def publish(client, tmp_path, rng, model, **extra):
    item_ids = [int(i) for i in rng.choice(10_000, size=N_ITEMS, replace=False)]
    run = publish_user_item_run(
        client,
        tmp_path / "out",
        tmp_path / "work",
        [1, 2],
        item_ids,
        rng.normal(size=(2, RANK)),
        rng.normal(size=(N_ITEMS, RANK)),
        pd.DataFrame({"user": [0, 1], "item": [0, 1], "rating": [1.0, 1.0]}),
        model=model,
        **extra,
    )
    return run, item_ids


def test_explicit_equals_the_trainers_user_half_step(client, tmp_path):
    rng = np.random.default_rng(0)
    run, item_ids = publish(
        client,
        tmp_path,
        rng,
        "explicit",
        user_bias=rng.normal(size=2).astype(np.float32),
        item_bias=rng.normal(size=N_ITEMS).astype(np.float32),
        global_mean=3.4,
        hyperparameters={"regularization": 0.12},
    )
    frame = new_ratings(rng, item_ids)

    folded = fold_in(tmp_path / "out", frame)

    side, users = entries(frame, item_ids)
    settings = TrainSettings(model="explicit", regularization=0.12, als_method="cholesky", device="cpu")
    expected = explicit_als.solve_side_block(
        side,
        RowBlock(torch.zeros(len(users), RANK), torch.zeros(len(users))),
        3.4,
        settings,
        RowBlock(torch.from_numpy(run.items), torch.from_numpy(run.item_bias)),
    )
    assert folded.ids.tolist() == users == ["a", "b", "c", "d"]
    np.testing.assert_allclose(folded.vectors, expected.vectors.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(folded.bias, expected.bias.numpy(), rtol=1e-5, atol=1e-5)
    assert folded.items_run_id == run.export.run_id and folded.unknown_items == 0


# A manifest from before the confidence setting records none: its run was linear.
@pytest.mark.parametrize(("confidence", "recorded"), [("linear", False), ("log", True), ("binary", True)])
def test_implicit_equals_the_trainers_user_half_step_on_the_liked_ratings(
    client, tmp_path, confidence, recorded
):
    rng = np.random.default_rng(1)
    hyperparameters = {"regularization": 0.1, "alpha": 2.0}
    if recorded:
        hyperparameters |= {"confidence": confidence, "confidence_epsilon": 0.5}
    run, item_ids = publish(
        client, tmp_path, rng, "implicit", like_threshold=3.0, hyperparameters=hyperparameters
    )
    frame = new_ratings(rng, item_ids, per_user=7)

    folded = fold_in(tmp_path / "out", frame)

    side, users = entries(frame[frame.rating >= 3.0], item_ids)
    settings = TrainSettings(
        model="implicit",
        regularization=0.1,
        alpha=2.0,
        confidence=confidence,
        confidence_epsilon=0.5,
        als_method="cholesky",
        device="cpu",
    )
    expected = implicit.als_block(
        side,
        RowBlock(torch.zeros(side.n_rows, RANK)),
        (0, side.n_rows),
        settings,
        False,
        RowBlock(torch.from_numpy(run.items)),
    )
    assert folded.ids.tolist() == users and folded.bias is None
    np.testing.assert_allclose(folded.vectors, expected.vectors.numpy(), rtol=1e-5, atol=1e-5)


def test_unknown_items_are_counted_and_skipped_with_a_warning(client, tmp_path, caplog):
    rng = np.random.default_rng(2)
    _, item_ids = publish(
        client, tmp_path, rng, "implicit", hyperparameters={"regularization": 0.1, "alpha": 1.0}
    )
    known = new_ratings(rng, item_ids, users=("x", "y"))
    strangers = pd.DataFrame({"user_id": ["x", "z", "z"], "item_id": [-1, -2, -3], "rating": [5.0, 5.0, 5.0]})

    with caplog.at_level(logging.WARNING, logger="mf_dist.stages.fold_in"):
        folded = fold_in(tmp_path / "out", pd.concat([known, strangers]))

    assert folded.unknown_items == 3 and folded.users_without_items == 1
    assert "3 ratings of items not in" in caplog.text
    alone = fold_in(tmp_path / "out", known)
    assert folded.ids.tolist() == ["x", "y"]
    np.testing.assert_array_equal(folded.vectors, alone.vectors)


def test_models_without_fold_in_and_bad_frames_are_refused(client, tmp_path):
    publish_items(client, tmp_path / "co", [1, 2, 3], np.eye(3, dtype=np.float32))
    with pytest.raises(ConfigError, match="cooccurrence model has no fold-in"):
        fold_in(tmp_path / "co", pd.DataFrame({"user_id": [1], "item_id": [1]}))
    rng = np.random.default_rng(3)
    publish(
        client,
        tmp_path,
        rng,
        "explicit",
        user_bias=np.zeros(2, np.float32),
        item_bias=np.zeros(N_ITEMS, np.float32),
        hyperparameters={"regularization": 0.1},
    )
    with pytest.raises(InputError, match="no column rating"):
        fold_in(tmp_path / "out", pd.DataFrame({"user_id": [1], "item_id": [1]}))
    with pytest.raises(InputError, match="duplicate"):
        fold_in(tmp_path / "out", pd.DataFrame({"user_id": [1, 1], "item_id": [4, 4], "rating": [1.0, 2.0]}))


@pytest.mark.parametrize(("model", "extra"), [("implicit", {}), ("explicit", {"with_bias": True})])
def test_users_solved_on_several_threads_equal_one_thread(client, tmp_path, monkeypatch, model, extra):
    """The users are cut into one share per torch thread: the same vectors (and biases) as on one."""
    from mf_dist.stages import fold_in as fold_in_module

    rng = np.random.default_rng(3)
    bias = {}
    if extra:
        bias = {
            "user_bias": rng.normal(size=2).astype(np.float32),
            "item_bias": rng.normal(size=N_ITEMS).astype(np.float32),
            "global_mean": 3.0,
        }
    _, item_ids = publish(
        client, tmp_path, rng, model, hyperparameters={"regularization": 0.1, "alpha": 2.0}, **bias
    )
    frame = new_ratings(rng, item_ids, users=[f"u{i:02d}" for i in range(23)], per_user=6)
    monkeypatch.setattr(fold_in_module, "MIN_USERS_PER_THREAD", 2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = fold_in(tmp_path / "out", frame)
        torch.set_num_threads(3)
        shared = fold_in(tmp_path / "out", frame)
    finally:
        torch.set_num_threads(threads)
    assert shared.ids.tolist() == alone.ids.tolist() == sorted(frame.user_id.unique())
    np.testing.assert_array_equal(shared.vectors, alone.vectors)
    if extra:
        np.testing.assert_array_equal(shared.bias, alone.bias)
