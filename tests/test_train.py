"""Train stage: both models lower their loss on 1 and 2 workers, deterministically."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mf_dist.cooccur import cooccurrence_blocks
from mf_dist.errors import ConfigError
from mf_dist.ingest import ingest_ratings
from mf_dist.train import train_factors

SETTINGS = {
    "cooccurrence": {"epochs": 15, "learning_rate": 0.1},
    "explicit": {"epochs": 4, "learning_rate": 0.01},
}


def prepare(client, source, work, model):
    ingest = ingest_ratings(client, str(source), work, block_size=100)
    if model == "cooccurrence":
        cooccurrence_blocks(client, ingest, work)
    return ingest


def train(client, work, model, seed=0, rank=4):
    return train_factors(
        client,
        work,
        model=model,
        rank=rank,
        regularization=0.05,
        batch_size=64,
        seed=seed,
        **SETTINGS[model],
    )


def factors(result):
    return {
        table.name: np.concatenate([table.read_block(b)[0] for b in range(table.grid.n_blocks)])
        for table in result.tables
    }


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("model", ["cooccurrence", "explicit"])
def test_loss_decreases_and_is_deterministic(clients, tmp_path, tiny_input, model, workers):
    """Training lowers the loss; the same seed and worker count give identical factors."""
    client = clients[workers]
    prepare(client, tiny_input, tmp_path / "work", model)
    first = train(client, tmp_path / "work", model)
    losses = [record.loss for record in first.history]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0]
    assert sum(b < a for a, b in itertools.pairwise(losses)) >= len(losses) - 2
    first_factors = factors(first)
    second = train(client, tmp_path / "work", model)
    assert [r.loss for r in second.history] == losses
    for name, values in factors(second).items():
        np.testing.assert_array_equal(values, first_factors[name])
    expected_tables = {"cooccurrence": {"items"}, "explicit": {"users", "items"}}[model]
    assert set(first_factors) == expected_tables
    assert first_factors["items"].shape[1] == 4


@pytest.mark.parametrize("model", ["cooccurrence", "explicit"])
def test_one_and_two_workers_agree(clients, tmp_path, tiny_input, model):
    """Tasks draw their randomness from their coordinates, not from where they run."""
    prepare(clients[2], tiny_input, tmp_path / "work", model)
    on_two = factors(train(clients[2], tmp_path / "work", model))
    on_one = factors(train(clients[1], tmp_path / "work", model))
    for name in on_two:
        np.testing.assert_allclose(on_one[name], on_two[name], rtol=1e-5, atol=1e-6)


def test_seed_changes_the_result(client, tmp_path, tiny_input):
    prepare(client, tiny_input, tmp_path / "work", "explicit")
    a = factors(train(client, tmp_path / "work", "explicit", seed=1))
    b = factors(train(client, tmp_path / "work", "explicit", seed=2))
    assert not np.allclose(a["items"], b["items"])


def test_rank_above_item_count_is_a_config_error(client, tmp_path, tiny_input):
    prepare(client, tiny_input, tmp_path / "work", "explicit")
    with pytest.raises(ConfigError, match="rank 5000 is larger than the number of items"):
        train(client, tmp_path / "work", "explicit", rank=5000)
