"""docs/architecture.md's worked example: a model added by an objective, a trainer and a registration.

The toy model (tests/support/toy_model/) is registered here, in the test,
and then accepted by the run configuration and trained, exported and
published by the real flow on a real Dask cluster: no other file knows it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mf_dist import read_embeddings
from mf_dist.config import load_config
from mf_dist.flows.pipeline import factorization_pipeline
from mf_dist.registry import MODELS, ModelDefaults, ModelSpec, SolverSpec, register
from mf_dist.storage.reader import read_manifest, resolve_run_dir
from tests.support.toy_model import objective

TOY = ModelSpec(
    name="toy",
    summary="Plain least squares on observed ratings (the worked example).",
    solvers={"gradient": SolverSpec("gradient", "tests.support.toy_model.trainer:ToyGradient")},
    defaults=ModelDefaults(epochs=12, learning_rate=0.006, rank=3, regularization=0.1),
    tables=lambda target: frozenset({"users", "items"}),
    needs_ratings=True,
)


@pytest.fixture
def toy_registered():
    register(TOY)
    yield TOY
    MODELS.pop(TOY.name)


def test_the_toy_objective_matches_autograd():
    generator = torch.Generator().manual_seed(0)
    users = torch.randn(5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    items = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    rows, cols = torch.tensor([0, 0, 1, 3, 4, 4]), torch.tensor([0, 2, 1, 3, 0, 3])
    ratings = torch.tensor([5.0, 3.0, 4.0, 1.0, 2.0, 5.0], dtype=torch.float64)
    loss, user_gradient, item_gradient = objective.loss_and_gradients(
        users.detach(), items.detach(), rows, cols, ratings, 0.3
    )
    dense = torch.zeros(5, 4, dtype=torch.float64)
    mask = torch.zeros(5, 4, dtype=torch.bool)
    dense[rows, cols], mask[rows, cols] = ratings, True
    reference = 0.5 * ((dense - users @ items.T)[mask] ** 2).sum() + 0.15 * (
        users.square().sum() + items.square().sum()
    )
    reference.backward()
    assert loss == pytest.approx(reference.item(), rel=1e-12)
    torch.testing.assert_close(user_gradient, users.grad)
    torch.testing.assert_close(item_gradient, items.grad)


def test_a_registered_model_runs_end_to_end(
    toy_registered, prefect_server, client, tmp_path, tiny_input, tiny_ratings
):
    config = load_config(
        input=str(tiny_input),
        output=str(tmp_path / "out"),
        model="toy",
        scheduler=client.scheduler.address,
        block_size=32,
        tolerance=0.0,
        cache=False,
    )
    assert config.train_settings.rank == 3 and config.train_settings.solver == "gradient"
    factorization_pipeline(config)
    users, items = read_embeddings(tmp_path / "out", "users"), read_embeddings(tmp_path / "out", "items")
    assert set(users.ids) == set(tiny_ratings.user_id) and set(items.ids) == set(tiny_ratings.item_id)
    assert users.vectors.shape[1] == items.vectors.shape[1] == 3
    manifest = read_manifest(resolve_run_dir(tmp_path / "out", "users"))
    losses = [record["loss"] for record in manifest["loss_history"]]
    assert [record["epoch"] for record in manifest["loss_history"]] == list(range(13))
    assert np.all(np.diff(losses) < 0) and losses[-1] < 0.5 * losses[0]
