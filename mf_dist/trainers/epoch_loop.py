"""The epoch loop every sharded model runs in: records, early stop, divergence, checkpoints.

A model (see :class:`ShardedModel`) only knows how to run one epoch on the
cluster and which factor blocks it holds; this loop decides when to stop,
turns a non-finite loss into an actionable :class:`TrainingError`, and
checkpoints the factor blocks after every epoch so that ``--resume`` can
continue from the last one with the same result.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from distributed import Future

from mf_dist.errors import TrainingError
from mf_dist.storage.checkpoints import Checkpoint, CheckpointStore
from mf_dist.storage.factor_files import EpochRecord, FactorTable

logger = logging.getLogger(__name__)

EpochCallback = Callable[[EpochRecord], None]

# A loss this many times the first one measured is divergence. Adam and
# Adagrad bound every step, so a learning rate far too large (the config
# allows up to 10) makes the loss jump by orders of magnitude and oscillate
# there without ever becoming non-finite; healthy runs never rise 1000-fold.
DIVERGENCE_FACTOR = 1000.0


@dataclass(frozen=True)
class Measurement:
    """The loss of the factors as they stood after ``epoch`` updates (0: the start)."""

    epoch: int
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)


class ShardedModel(Protocol):
    """What the loop needs from a model whose factor blocks live on Dask workers."""

    def run_epoch(self, epoch: int) -> list[Measurement]:
        """Update every factor block once; return the losses measured on the way."""
        ...

    def finish(self) -> list[Measurement]:
        """Losses still owed after the last epoch (models that measure before a step)."""
        ...

    def factor_blocks(self) -> dict[str, tuple[FactorTable, list[Future]]]:
        """Table name → (layout, row-block futures of :class:`~mf_dist.blocks.RowBlock`)."""
        ...

    def divergence_advice(self) -> str:
        """What to change when the loss stops being finite, e.g. the learning rate."""
        ...


@dataclass
class LoopOutcome:
    history: list[EpochRecord]
    epochs_run: int
    stopped_early: bool


def run_epochs(
    client: object,
    model: ShardedModel,
    *,
    epochs: int,
    tolerance: float,
    store: CheckpointStore,
    resumed: Checkpoint | None = None,
    on_epoch: EpochCallback | None = None,
    objective_name: str = "loss",
) -> LoopOutcome:
    """Run epochs ``resumed.epoch + 1 .. epochs`` of ``model``; see the module docstring.

    Early stop: when an epoch lowers the loss by less than ``tolerance`` times
    the previous loss (a rise does not stop it: gradient solvers may climb
    briefly). Raises :class:`TrainingError` on a non-finite loss, or one
    above :data:`DIVERGENCE_FACTOR` times the first loss, naming the epoch and
    the setting to change.
    """
    history = list(resumed.history) if resumed else []
    first = resumed.epoch + 1 if resumed else 1
    started = time.perf_counter() - (history[-1].seconds if history else 0.0)

    def record(measurement: Measurement) -> None:
        if not math.isfinite(measurement.loss):
            raise TrainingError(
                f"the {objective_name} became non-finite at epoch {measurement.epoch}: "
                f"{model.divergence_advice()}"
            )
        if history and history[0].loss > 0 and measurement.loss > DIVERGENCE_FACTOR * history[0].loss:
            raise TrainingError(
                f"the {objective_name} diverged at epoch {measurement.epoch}: it rose from "
                f"{history[0].loss:.4g} (epoch {history[0].epoch}) to {measurement.loss:.4g}; "
                f"{model.divergence_advice()}"
            )
        entry = EpochRecord(
            epoch=measurement.epoch,
            loss=measurement.loss,
            metrics=measurement.metrics,
            seconds=round(time.perf_counter() - started, 4),
        )
        history.append(entry)
        if on_epoch:
            on_epoch(entry)

    def converged() -> bool:
        if tolerance <= 0 or len(history) < 2:
            return False
        before, after = history[-2].loss, history[-1].loss
        return 0 <= before - after < tolerance * abs(before)

    epoch = first - 1
    stopped_early = False
    try:
        for epoch in range(first, epochs + 1):
            for measurement in model.run_epoch(epoch):
                record(measurement)
            store.write(client, epoch, history, model.factor_blocks())  # type: ignore[arg-type]
            if converged() and epoch < epochs:
                logger.info("loss improved by less than %g at epoch %d: stopping early", tolerance, epoch)
                stopped_early = True
                break
    except BaseException:
        # The last epoch that finished is still worth resuming from; its own
        # failure must not hide the error that stopped the run.
        with contextlib.suppress(Exception):
            store.complete()
        raise
    store.complete()
    for measurement in model.finish():
        record(measurement)
    return LoopOutcome(history=history, epochs_run=epoch, stopped_early=stopped_early)
