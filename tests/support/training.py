"""Small training settings and the trained factors of a result, for the trainer tests."""

from __future__ import annotations

import numpy as np

from mf_dist.registry import model_spec
from mf_dist.settings import TrainSettings

# Few epochs, tiny data: enough for each solver to make clear progress. A model
# not named here gets a fifth of its default epochs (at least 3).
EPOCHS = {"cooccurrence": 12, "explicit": 4, "implicit": 4, "nmf": 10}


def few_epochs(model: str) -> int:
    """Epochs of the trainer tests for ``model``."""
    return EPOCHS.get(model, max(3, model_spec(model).defaults.epochs // 5))


LEARNING_RATES = {
    ("cooccurrence", "gradient"): 0.1,
    ("explicit", "gradient"): 0.01,
    ("implicit", "gradient"): 0.05,
    ("nmf", "gradient"): 1.0,
}


def settings(model, solver, **overrides):
    values = {
        "model": model,
        "solver": solver,
        "rank": 4,
        "epochs": few_epochs(model),
        "learning_rate": LEARNING_RATES.get((model, solver), 0.05),
        "regularization": 0.05,
        "batch_size": 64,
        # Fixed here, not per model (TrainSettings would fill in the model's, e.g.
        # adagrad and cholesky for explicit): what these tests were tuned with.
        "optimizer": "adam",
        "als_method": "cg",
        "seed": 0,
        "tolerance": 0.0,
    }
    values.update(overrides)
    return TrainSettings(**values)


def factors(result):
    return {
        table.name: np.concatenate([table.read_block(b)[0] for b in range(table.grid.n_blocks)])
        for table in result.tables
    }
