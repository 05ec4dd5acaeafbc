"""The base of every sharded trainer: what all of them hold, submit, start from and publish alike.

A trainer trains one model with one solver (its class is named
``<Model><Solver>``, e.g. :class:`~mf_dist.trainers.explicit_als.ExplicitALS`)
and keeps its factor blocks as futures on the Dask workers. A subclass
implements :meth:`Trainer.run_epoch` and declares its tables
(:meth:`Trainer._tables`); :class:`Trainer` owns the rest:

- the client, the settings, and the worker resources training tasks ask for;
- task submission, one :class:`TaskSubmitter` for every task a trainer submits;
- the random start of a table (:meth:`Trainer._random_blocks`);
- each table's published layout and :meth:`Trainer.factor_blocks`;
- the defaults of :meth:`Trainer.finish` and :meth:`Trainer.divergence_advice`;
- :meth:`Trainer.build`, the constructor the model registry names.

Two table layouts recur and have their bases here: a ``users`` and an
``items`` table fitted to the ratings (:class:`UserItemTrainer`), and the
co-occurrence embedding's one ``items`` table fitted to X = SᵀS
(:class:`CooccurrenceTrainer`).

A trainer satisfies :class:`~mf_dist.trainers.epoch_loop.ShardedModel`, the
interface of the epoch loop every model shares.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from distributed import Client, Future

from mf_dist.blocks import BlockGrid
from mf_dist.settings import TrainSettings
from mf_dist.storage.factor_files import FactorTable, block_seed
from mf_dist.storage.ingested import IngestResult
from mf_dist.storage.tiles import load_cooccurrence_result
from mf_dist.trainers.epoch_loop import Measurement
from mf_dist.trainers.tasks import as_row_block, block_state, block_vectors, random_row_block

Resources = dict[str, float] | None


class TaskSubmitter:
    """How every training task is submitted: never memoised, on the workers that have the training resources.

    ``pure=False``: a task makes new blocks (or draws random numbers), so two
    submissions with the same arguments are two tasks. ``resources``
    (``{"GPU": 1}`` where workers have GPUs, else None) keeps the tasks that
    compute on a device on a worker that has one, one at a time per device;
    ``anywhere=True`` lifts it for tasks that only unpack or sum small CPU
    results, which then need not queue for a device. ``options`` go to
    :meth:`distributed.Client.submit` as they are (e.g. a preferred worker).
    """

    def __init__(self, client: Client, resources: Resources) -> None:
        self.client = client
        self.resources = resources

    def __call__(
        self, function: Callable, *args: object, anywhere: bool = False, **options: object
    ) -> Future:
        resources = None if anywhere else self.resources
        return self.client.submit(function, *args, resources=resources, pure=False, **options)


@dataclass(frozen=True)
class TrainingInputs:
    """What the train stage hands a trainer: the arguments of :meth:`Trainer.build`."""

    client: Client
    work_dir: str
    ingest: IngestResult
    settings: TrainSettings
    resources: Resources
    initial: dict[str, list[Future]]
    """Table name → futures of :class:`~mf_dist.blocks.RowBlock` to start from (a checkpoint or a
    warm start), one per block of the table; a table not named here starts at random."""


class Trainer(ABC):
    """One model × solver on the cluster; see the module docstring."""

    has_bias: ClassVar[bool] = False
    """Whether the rows of this trainer's tables carry a bias (published beside the vectors)."""

    def __init__(self, inputs: TrainingInputs) -> None:
        self.client = inputs.client
        self.settings = inputs.settings
        self.resources = inputs.resources
        self.ingest = inputs.ingest
        self._submit = TaskSubmitter(inputs.client, inputs.resources)

    @classmethod
    def build(
        cls,
        client: Client,
        work_dir: str | Path,
        ingest: IngestResult,
        settings: TrainSettings,
        resources: Resources,
        initial: dict[str, list[Future]] | None,
    ) -> Trainer:
        """The trainer for ``settings``, started from ``initial`` (see :class:`TrainingInputs`) or at random.

        The factory a :class:`~mf_dist.registry.SolverSpec` names. It submits
        the loading of the trainer's data and its starting blocks and returns
        without waiting for them, except where a trainer needs a number from
        the data to start (a scale, a norm).
        """
        inputs = TrainingInputs(client, str(work_dir), ingest, settings, resources, initial or {})
        return cls._variant(settings)(inputs)

    @classmethod
    def _variant(cls, settings: TrainSettings) -> type[Trainer]:
        """The class that trains under ``settings``: this one, unless a setting (a loss) picks another."""
        return cls

    @abstractmethod
    def run_epoch(self, epoch: int) -> list[Measurement]:
        """Update every factor block once; return the losses measured on the way."""

    @abstractmethod
    def _tables(self) -> dict[str, tuple[BlockGrid, list[Future]]]:
        """Table name → (the grid of its rows, futures of its current :class:`~mf_dist.blocks.RowBlock`)."""

    def finish(self) -> list[Measurement]:
        """Losses still owed after the last epoch: none, unless a trainer measures before its steps."""
        return []

    def factor_blocks(self) -> dict[str, tuple[FactorTable, list[Future]]]:
        """Table name → (its layout, without a directory yet; futures of its row blocks)."""
        return {
            name: (
                FactorTable(
                    name=name,
                    directory="",
                    n_rows=grid.n_rows,
                    block_size=grid.block_size,
                    rank=self.settings.rank,
                    has_bias=self.has_bias,
                ),
                blocks,
            )
            for name, (grid, blocks) in self._tables().items()
        }

    def divergence_advice(self) -> str:
        """What to change when the loss stops being finite; gradient steps: the learning rate."""
        return f"lower --learning-rate (now {self.settings.learning_rate})"

    def _random_blocks(self, grid: BlockGrid, scale: float, side: int | None) -> list[Future]:
        """Futures of a fresh row block per block of ``grid``: N(0, scale²) vectors (float32, rows × rank).

        The blocks have zero biases where :attr:`has_bias`. Block b is drawn
        from ``block_seed(seed, 0, side, b)``, or from ``block_seed(seed, 0, b)``
        where ``side`` is None: the seeds the one-table co-occurrence models
        have always started from, kept so that their results stay the same.
        """
        stream = (0,) if side is None else (0, side)
        seed, rank = self.settings.seed, self.settings.rank
        return [
            self._submit(
                random_row_block, stop - start, rank, scale, block_seed(seed, *stream, block), self.has_bias
            )
            for block, start, stop in grid
        ]

    def _as_row_blocks(self, vectors: list[Future], states: list[Future] | None = None) -> list[Future]:
        """Futures of row blocks (no biases) of a table held as vector and optimiser-state futures."""
        if states is None:
            return [self._submit(as_row_block, v, None) for v in vectors]
        return [self._submit(as_row_block, v, st) for v, st in zip(vectors, states, strict=True)]


class UserItemTrainer(Trainer):
    """A trainer of a ``users`` and an ``items`` table, over the ingest's user and item grids.

    ``users`` and ``items`` hold one :class:`~mf_dist.blocks.RowBlock` future
    per block, given or drawn at random with :attr:`initial_scale`.
    """

    initial_scale: ClassVar[float]
    """The standard deviation of a fresh table's entries."""

    def __init__(self, inputs: TrainingInputs) -> None:
        super().__init__(inputs)
        # The starting factors before any data: Dask runs ready tasks in the
        # order they were submitted, and the first solves need a whole side.
        self.users: list[Future] = inputs.initial.get("users") or self._random_blocks(
            self.ingest.user_grid, self.initial_scale, 0
        )
        self.items: list[Future] = inputs.initial.get("items") or self._random_blocks(
            self.ingest.item_grid, self.initial_scale, 1
        )

    def _tables(self) -> dict[str, tuple[BlockGrid, list[Future]]]:
        return {"users": (self.ingest.user_grid, self.users), "items": (self.ingest.item_grid, self.items)}


class CooccurrenceTrainer(Trainer):
    """A trainer of the co-occurrence embedding's one table, ``items``: V (items × rank), fitted to X.

    V is held as a tensor future per block (``vectors``, float32), the form
    the products with X take, and the gradient solvers' optimiser states
    apart (``states``; None for solvers without). ``norm`` is what the
    ``relative_loss`` metric divides by.
    """

    norm: float

    def __init__(self, inputs: TrainingInputs) -> None:
        super().__init__(inputs)
        self.cooccurrence = load_cooccurrence_result(inputs.work_dir)
        self.grid = self.cooccurrence.item_grid
        self.vectors: list[Future] = []
        self.states: list[Future] | None = None

    def _start(self, initial: dict[str, list[Future]], scale: float, *, with_states: bool) -> None:
        """Start V from ``initial["items"]`` when given, else at random with entries N(0, scale²)."""
        blocks = initial.get("items") or self._random_blocks(self.grid, scale, None)
        self.vectors = [self._submit(block_vectors, b) for b in blocks]
        self.states = [self._submit(block_state, b) for b in blocks] if with_states else None

    def _tables(self) -> dict[str, tuple[BlockGrid, list[Future]]]:
        return {"items": (self.grid, self._as_row_blocks(self.vectors, self.states))}

    def _measure(self, epoch: int, loss: float, extra: dict[str, float] | None = None) -> Measurement:
        return Measurement(epoch, loss, {"relative_loss": loss / self.norm, **(extra or {})})
