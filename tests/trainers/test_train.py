"""Train stage: every model × solver lowers its loss on 1 and 2 workers, deterministically,
stops early, refuses to diverge quietly, checkpoints, resumes and warm-starts."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
import torch

from mf_dist.blocks import RowBlock
from mf_dist.errors import ConfigError, TrainingError
from mf_dist.registry import MODELS
from mf_dist.stages.cooccur import cooccurrence_blocks
from mf_dist.stages.ingest import ingest_ratings
from mf_dist.stages.train import train_factors
from mf_dist.storage.checkpoints import CheckpointStore
from mf_dist.storage.factor_files import FactorTable
from mf_dist.trainers.epoch_loop import run_epochs
from tests.support.training import factors, settings

MODEL_SOLVER_PAIRS = sorted((spec.name, solver) for spec in MODELS.values() for solver in spec.solvers)


def prepare(client, source, work, model, like_threshold=None, target="cooccurrence"):
    ingest = ingest_ratings(client, str(source), work, block_size=100, like_threshold=like_threshold)
    if MODELS[model].needs_cooccurrence(target):
        cooccurrence_blocks(client, ingest, work)
    return ingest


# One worker is in the slow tier: the default run checks determinism on two
# (the harder case) and test_one_and_two_workers_agree covers one.
@pytest.mark.parametrize("workers", [pytest.param(1, marks=pytest.mark.slow), 2])
@pytest.mark.parametrize(("model", "solver"), MODEL_SOLVER_PAIRS)
def test_loss_decreases_and_is_deterministic(clients, tmp_path, tiny_input, model, solver, workers):
    """Training lowers the loss; the same seed and worker count give identical factors."""
    client = clients[workers]
    prepare(client, tiny_input, tmp_path / "work", model)
    first = train_factors(client, tmp_path / "work", settings(model, solver))
    losses = [record.loss for record in first.history]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0] if model == "cooccurrence" else losses[-1] < losses[0]
    assert sum(b <= a for a, b in itertools.pairwise(losses)) >= len(losses) - 2
    first_factors = factors(first)
    second = train_factors(client, tmp_path / "work", settings(model, solver))
    assert [r.loss for r in second.history] == losses
    for name, values in factors(second).items():
        np.testing.assert_array_equal(values, first_factors[name])
    assert set(first_factors) == MODELS[model].tables(first.settings["target"])
    assert all(values.shape[1] == 4 for values in first_factors.values())


@pytest.mark.parametrize(("model", "solver"), MODEL_SOLVER_PAIRS)
def test_one_and_two_workers_agree(clients, tmp_path, tiny_input, model, solver):
    """Tasks draw their randomness from their coordinates, not from where they run."""
    prepare(clients[2], tiny_input, tmp_path / "work", model)
    on_two = factors(train_factors(clients[2], tmp_path / "work", settings(model, solver, epochs=2)))
    on_one = factors(train_factors(clients[1], tmp_path / "work", settings(model, solver, epochs=2)))
    for name in on_two:
        np.testing.assert_allclose(on_one[name], on_two[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("model", "solver"), MODEL_SOLVER_PAIRS)
def test_resume_continues_to_the_same_result(client, tmp_path, tiny_input, model, solver):
    """An interrupted run resumed from its checkpoint ends where an uninterrupted one does."""
    work = tmp_path / "work"
    prepare(client, tiny_input, work, model)
    whole = train_factors(client, work, settings(model, solver, epochs=4))
    train_factors(client, work, settings(model, solver, epochs=2))
    checkpoints = work / "checkpoints" / model
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch-00001", "epoch-00002"]
    resumed = train_factors(client, work, settings(model, solver, epochs=4, resume=True))
    assert [r.loss for r in resumed.history] == pytest.approx([r.loss for r in whole.history], rel=1e-6)
    for name, values in factors(resumed).items():
        np.testing.assert_allclose(values, factors(whole)[name], rtol=1e-5, atol=1e-6)


def test_resume_with_changed_settings_is_refused(client, tmp_path, tiny_input):
    work = tmp_path / "work"
    prepare(client, tiny_input, work, "explicit")
    train_factors(client, work, settings("explicit", "als", epochs=1))
    with pytest.raises(ConfigError, match=r"cannot --resume .*rank 4 → 5"):
        train_factors(client, work, settings("explicit", "als", epochs=2, rank=5, resume=True))


@pytest.mark.parametrize("model", ["explicit", "implicit"])
def test_tolerance_stops_early(client, tmp_path, tiny_input, model):
    """The factors of an early stop are those of its last epoch, not of work started past it.

    (The implicit trainer submits the next epoch's user side before the loss
    that decides whether there is a next epoch.)
    """
    prepare(client, tiny_input, tmp_path / "work", model)
    result = train_factors(client, tmp_path / "work", settings(model, "als", epochs=50, tolerance=0.01))
    assert result.stopped_early and result.epochs < 50
    before, after = result.history[-2].loss, result.history[-1].loss
    assert 0 <= before - after < 0.01 * before
    exactly = train_factors(client, tmp_path / "work", settings(model, "als", epochs=result.epochs))
    for name, values in factors(result).items():
        np.testing.assert_allclose(values, factors(exactly)[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("model", "solver"), [("cooccurrence", "gradient"), ("explicit", "gradient")])
def test_divergence_is_a_clear_error(client, tmp_path, tiny_input, model, solver):
    prepare(client, tiny_input, tmp_path / "work", model)
    advice = r"lower --learning-rate \(now 1e\+30\)"
    with pytest.raises(TrainingError, match=rf"(non-finite|diverged) at epoch \d+: .*{advice}"):
        train_factors(client, tmp_path / "work", settings(model, solver, learning_rate=1e30, epochs=6))


class FailingAt:
    """A real model whose ``run_epoch`` raises at one epoch, as a lost worker would."""

    def __init__(self, model, epoch: int) -> None:
        self.model, self.epoch = model, epoch

    def run_epoch(self, epoch: int):
        if epoch == self.epoch:
            raise RuntimeError(f"worker lost during epoch {epoch}")
        return self.model.run_epoch(epoch)

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def test_a_failed_run_leaves_its_last_finished_epoch_to_resume_from(client, tmp_path, tiny_input):
    """Checkpoints are published one epoch late; a run that fails still publishes the one before."""
    work = tmp_path / "work"
    ingest = prepare(client, tiny_input, work, "explicit")
    chosen = settings("explicit", "als", epochs=6)
    model = MODELS["explicit"].solvers["als"].factory()(client, work, ingest, chosen, None, None)
    store = CheckpointStore(work / "checkpoints" / "explicit", chosen)
    with pytest.raises(RuntimeError, match="worker lost during epoch 4"):
        run_epochs(client, FailingAt(model, 4), epochs=6, tolerance=0.0, store=store)
    latest = store.latest()
    assert latest is not None and latest.epoch == 3
    assert [record.epoch for record in latest.history] == [1, 2, 3]
    resumed = train_factors(client, work, settings("explicit", "als", epochs=6, resume=True))
    whole = train_factors(client, work, chosen)
    assert [r.loss for r in resumed.history] == pytest.approx([r.loss for r in whole.history], rel=1e-6)


def test_a_checkpoint_is_published_when_it_is_complete(client, tmp_path):
    """write() starts the saves and publishes the epoch before; complete() publishes the last one."""
    store = CheckpointStore(tmp_path / "checkpoints", settings("explicit", "als"))
    table = FactorTable(name="items", directory="", n_rows=3, block_size=2, rank=2, has_bias=False)
    blocks = [client.scatter(RowBlock(vectors=torch.full((n, 2), float(n)))) for n in (2, 1)]
    store.write(client, 1, [], {"items": (table, blocks)})
    assert store.completed_epochs() == []
    store.write(client, 2, [], {"items": (table, blocks)})
    assert store.completed_epochs() == [1]
    store.complete()
    assert store.completed_epochs() == [1, 2]
    saved = store.latest().tables[0]
    np.testing.assert_array_equal(saved.read_block(1)[0], np.ones((1, 2), dtype=np.float32))


def test_warm_start_converges_in_fewer_epochs(client, tmp_path, tiny_input):
    """Starting from yesterday's published factors beats a cold start at the same epoch count."""
    from mf_dist.stages.export import export_tables
    from mf_dist.storage.ingested import load_ingest_result

    work = tmp_path / "work"
    prepare(client, tiny_input, work, "explicit")
    trained = train_factors(client, work, settings("explicit", "als", epochs=6))
    export_tables(client, trained, load_ingest_result(work), tmp_path / "out", run_id="yesterday", config={})
    shutil.rmtree(work / "checkpoints")
    cold = train_factors(client, work, settings("explicit", "als", epochs=2))
    warm = train_factors(client, work, settings("explicit", "als", epochs=2, init_from=str(tmp_path / "out")))
    assert warm.history[0].loss < cold.history[0].loss
    assert warm.history[-1].loss < cold.history[-1].loss
    assert warm.history[0].loss <= trained.history[-1].loss * 1.01


def test_warm_start_with_another_rank_is_refused(client, tmp_path, tiny_input):
    from mf_dist.stages.export import export_tables
    from mf_dist.storage.ingested import load_ingest_result

    work = tmp_path / "work"
    prepare(client, tiny_input, work, "explicit")
    trained = train_factors(client, work, settings("explicit", "als", epochs=1))
    export_tables(client, trained, load_ingest_result(work), tmp_path / "out", run_id="r1", config={})
    with pytest.raises(ConfigError, match="has rank 4 but this run has rank 6"):
        train_factors(client, work, settings("explicit", "als", rank=6, init_from=str(tmp_path / "out")))


def test_seed_changes_the_result(client, tmp_path, tiny_input):
    prepare(client, tiny_input, tmp_path / "work", "explicit")
    a = factors(train_factors(client, tmp_path / "work", settings("explicit", "gradient", seed=1)))
    b = factors(train_factors(client, tmp_path / "work", settings("explicit", "gradient", seed=2)))
    assert not np.allclose(a["items"], b["items"])


def test_rank_above_item_count_is_a_config_error(client, tmp_path, tiny_input):
    prepare(client, tiny_input, tmp_path / "work", "explicit")
    with pytest.raises(ConfigError, match="rank 1000 is larger than the number of items"):
        train_factors(client, tmp_path / "work", settings("explicit", "als", rank=1000))
