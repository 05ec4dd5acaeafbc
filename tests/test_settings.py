"""Training settings declared once: the run's values, the trainers' resolved ones, the registry's names."""

from __future__ import annotations

import dataclasses
import json

import pytest
from pydantic import ValidationError

from mf_dist.config import RunConfig, load_config
from mf_dist.errors import ConfigError
from mf_dist.registry import MODELS, ModelDefaults, model_spec
from mf_dist.settings import PER_MODEL_SETTINGS, TrainingOptions, TrainSettings

# RunConfig.train_settings of the default run, dumped by the code before the
# settings were declared once (order included: manifests show it). The stage
# cache keys and the published manifests hold this dump, so it changes only on
# purpose: the confidence setting and the cross-validated defaults of issue 17
# (co-occurrence at rank 64; implicit log confidence, α 1, λ 30).
COOCCURRENCE_DEFAULTS = {
    "model": "cooccurrence",
    "solver": "gradient",
    "rank": 64,
    "epochs": 60,
    "learning_rate": 0.1,
    "regularization": 0.0,
    "batch_size": 1024,
    "optimizer": "adam",
    "alpha": 1.0,
    "confidence": "log",
    "confidence_epsilon": 1.0,
    "als_method": "cg",
    "cg_steps": 3,
    "loss": "squared",
    "weight_x_max": 100.0,
    "weight_power": 0.75,
    "log_target": False,
    "target": "cooccurrence",
    "x_products": "auto",
    "tolerance": 0.0001,
    "seed": 0,
    "device": "auto",
    "resume": False,
    "init_from": None,
}

# (run settings, how its frozen dump differs from COOCCURRENCE_DEFAULTS), also frozen from the old code.
FROZEN_TRAIN_SETTINGS = [
    ({}, {}),
    (
        {"model": "explicit"},
        {
            "model": "explicit",
            "solver": "als",
            "rank": 64,
            "epochs": 20,
            "regularization": 0.12,
            "optimizer": "adagrad",
            "als_method": "cholesky",
        },
    ),
    (
        {
            "model": "explicit",
            "solver": "gradient",
            "rank": 8,
            "epochs": 3,
            "regularization": 0.0,
            "tolerance": 0,
        },
        {
            "model": "explicit",
            "solver": "gradient",
            "rank": 8,
            "epochs": 3,
            "optimizer": "adagrad",
            "als_method": "cholesky",
            "tolerance": 0.0,
        },
    ),
    (
        {
            "model": "implicit",
            "solver": "gradient",
            "alpha": 2.5,
            "learning_rate": 0.5,
            "als_method": "cholesky",
        },
        {
            "model": "implicit",
            "solver": "gradient",
            "rank": 32,
            "epochs": 15,
            "learning_rate": 0.5,
            "regularization": 30.0,
            "alpha": 2.5,
            "als_method": "cholesky",
        },
    ),
    (
        {"model": "nmf", "target": "ratings", "optimizer": "adagrad", "batch_size": 256, "seed": 7},
        {
            "model": "nmf",
            "solver": "mu",
            "rank": 32,
            "epochs": 200,
            "learning_rate": 1.0,
            "batch_size": 256,
            "optimizer": "adagrad",
            "target": "ratings",
            "seed": 7,
        },
    ),
    (
        {
            "solver": "als",
            "loss": "weighted",
            "log_target": True,
            "x_products": "likes",
            "weight_x_max": 50.0,
            "weight_power": 0.5,
            "cg_steps": 5,
            "device": "cpu",
            "resume": True,
            "init_from": "prev",
        },
        {
            "solver": "als",
            "cg_steps": 5,
            "loss": "weighted",
            "weight_x_max": 50.0,
            "weight_power": 0.5,
            "log_target": True,
            "x_products": "likes",
            "device": "cpu",
            "resume": True,
            "init_from": "prev",
        },
    ),
]


@pytest.mark.parametrize(("settings", "changes"), FROZEN_TRAIN_SETTINGS)
def test_train_settings_are_those_of_the_old_code(settings, changes):
    resolved = load_config(None, input="in", output="out", workers=2, **settings).train_settings
    expected = {**COOCCURRENCE_DEFAULTS, **changes}
    # Compared as lists of pairs: the values, their types (1 is not 1.0 in JSON) and the order.
    dumped = json.dumps(list(resolved.model_dump(mode="json").items()))
    assert dumped == json.dumps(list(expected.items()))


def test_the_run_config_dump_holds_the_same_values():
    """The stage cache keys hash the run config's dump with sorted keys: its values must not change."""
    dump = RunConfig(input="in", output="out", workers=2).model_dump(mode="json")
    old = {
        **COOCCURRENCE_DEFAULTS,
        "solver": "auto",
        **dict.fromkeys(PER_MODEL_SETTINGS),
        "input": "in",
        "output": "out",
        "work_dir": None,
        "block_size": 4096,
        "holdout": 0.0,
        "user_col": "user_id",
        "item_col": "item_id",
        "rating_col": "rating",
        "timestamp_col": "timestamp",
        "like_threshold": None,
        "rating_min": None,
        "rating_max": None,
        "duplicates": "auto",
        "workers": 2,
        "threads_per_worker": 1,
        "scheduler": None,
        "retries": 1,
        "retry_delay_seconds": 10.0,
        "cache": True,
        "neighbors": 0,
        "neighbors_metric": "cosine",
    }
    assert {key: dump[key] for key in old} == old
    assert dump["cluster"]["kind"] == "local"


def test_training_settings_are_declared_once():
    """RunConfig and TrainSettings have the training fields of TrainingOptions, not copies."""
    assert issubclass(RunConfig, TrainingOptions) and issubclass(TrainSettings, TrainingOptions)
    assert list(TrainSettings.model_fields) == list(TrainingOptions.model_fields)
    assert list(RunConfig.model_fields)[: len(TrainingOptions.model_fields)] == list(
        TrainingOptions.model_fields
    )
    # TrainSettings declares only the resolved types of the per-model settings.
    assert set(TrainSettings.__annotations__) == {"solver", *PER_MODEL_SETTINGS}


def test_per_model_settings_are_the_registry_defaults_by_name():
    """Each ModelDefaults field is a training setting a run may leave unset (None)."""
    for field in dataclasses.fields(ModelDefaults):
        assert field.name in TrainingOptions.model_fields
        assert TrainingOptions.model_fields[field.name].default is None


@pytest.mark.parametrize("model", list(MODELS))
def test_train_settings_built_directly_resolve_like_a_run(model):
    direct = TrainSettings(model=model, solver="auto", rank=None)
    assert direct == RunConfig(input="in", output="out", model=model).train_settings
    spec = MODELS[model]
    assert direct.solver == spec.default_solver
    assert {name: getattr(direct, name) for name in PER_MODEL_SETTINGS} == dataclasses.asdict(spec.defaults)


def test_given_settings_are_kept():
    settings = TrainSettings(
        model="explicit", solver="gradient", optimizer="adam", regularization=0.0, rank=3
    )
    assert (settings.solver, settings.optimizer, settings.regularization, settings.rank) == (
        "gradient",
        "adam",
        0.0,
        3,
    )
    assert settings.als_method == "cholesky"


def test_an_unknown_model_lists_the_registered_ones():
    registered = ", ".join(MODELS)
    with pytest.raises(ConfigError, match=f"model: no model 'svd'; registered: {registered} \\(got 'svd'\\)"):
        load_config(None, input="in", output="out", model="svd")
    with pytest.raises(ValidationError, match=f"no model 'svd'; registered: {registered}"):
        TrainSettings(model="svd")


def test_solvers_come_from_the_registry():
    with pytest.raises(ConfigError, match="solver: no solver 'sgd'; registered: auto, als, gradient, mu"):
        load_config(None, input="in", output="out", solver="sgd")
    with pytest.raises(ConfigError, match="the nmf model has no solver 'als'; choose one of mu, gradient"):
        load_config(None, input="in", output="out", model="nmf", solver="als")
    # What the trainers read is always a solver: 'auto' is resolved.
    assert TrainSettings.model_json_schema()["properties"]["solver"]["enum"] == ["als", "gradient", "mu"]
    assert RunConfig.model_json_schema()["properties"]["solver"]["enum"] == ["auto", "als", "gradient", "mu"]


def test_a_registered_model_is_accepted(monkeypatch):
    toy = dataclasses.replace(MODELS["implicit"], name="toy")
    monkeypatch.setitem(MODELS, "toy", toy)
    settings = RunConfig(input="in", output="out", model="toy").train_settings
    assert (settings.model, settings.solver, settings.rank) == ("toy", "als", toy.defaults.rank)


def test_the_trainers_take_values_a_run_refuses():
    """A run's upper bounds on epochs and learning rate are the run's: tests drive trainers to divergence."""
    settings = TrainSettings(learning_rate=1e30, epochs=200_000)
    assert (settings.learning_rate, settings.epochs) == (1e30, 200_000)
    with pytest.raises(ConfigError, match=r"epochs: .*less than or equal to 100000.*learning_rate: .*10"):
        load_config(None, input="in", output="out", epochs=200_000, learning_rate=1e30)


@pytest.mark.parametrize(
    ("model", "target"),
    [
        ("explicit", "cooccurrence"),
        ("implicit", "cooccurrence"),
        ("nmf", "ratings"),
        ("cooccurrence", "ratings"),
    ],
)
def test_recommend_needs_a_model_with_user_vectors(model, target):
    """--recommend is accepted exactly where the registry says the model publishes users."""
    if model_spec(model).has_users(target):
        assert RunConfig(input="in", output="out", model=model, target=target, recommend=5).recommend == 5
    else:
        with pytest.raises(ValidationError, match="has no user vectors"):
            RunConfig(input="in", output="out", model=model, target=target, recommend=5)
    assert RunConfig(input="in", output="out", model=model, target=target).recommend == 0


def test_the_seen_rule_follows_what_the_model_fits():
    """Rating-value models count every rated item as seen; the others, the liked ones."""
    builtin = ("cooccurrence", "explicit", "implicit", "nmf")
    assert {name: model_spec(name).seen_items for name in builtin} == {
        "cooccurrence": "liked",
        "explicit": "rated",
        "implicit": "liked",
        "nmf": "liked",
    }
    assert [name for name in builtin if model_spec(name).has_users("ratings")] == [
        "explicit",
        "implicit",
        "nmf",
    ]
