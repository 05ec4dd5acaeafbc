"""Per-epoch checkpoints of the factor blocks, and the resume point they give.

Layout under ``<work>/checkpoints/<model>/``::

    epoch-00007/<table>/block-00000.embedding.npy   float32, rows × rank
    epoch-00007/<table>/block-00000.bias.npy        float32, rows (models with biases)
    epoch-00007/<table>/block-00000.state.npz       optimiser state (gradient solvers)
    epoch-00007/checkpoint.json                     epoch, loss history, settings

An epoch is written under ``.epoch-00007.partial/`` and renamed when complete;
``checkpoint.json`` is written last and fsynced, so a directory without it is
debris from a crash and is ignored. On an object store (a work directory
URL) there is no rename: the epoch is written straight under
``epoch-00007/``, and its ``checkpoint.json``, written last, is what makes
it complete. The blocks of epoch e are saved by worker
tasks while epoch e + 1 runs, and epoch e is published (JSON, rename) when
e + 1 asks for its own checkpoint or the loop ends: waiting for the saves
after every epoch idled the workers for a fifth of a short epoch. A crash
in between resumes from epoch e − 1, which is still complete on disk.
Everything is ``.npy``/``.npz``/JSON read with ``allow_pickle=False``:
nothing read back is unpickled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from distributed import Client, Future
from pydantic import BaseModel

from mf_dist.blocks import OptimizerState, RowBlock
from mf_dist.errors import ConfigError
from mf_dist.settings import TrainSettings
from mf_dist.storage.factor_files import EpochRecord, FactorTable, write_factor_block
from mf_dist.storage.store import (
    delete_prefix,
    exists,
    is_remote,
    join,
    list_names,
    load_arrays,
    read_bytes,
    save_arrays,
    write_bytes,
)

CHECKPOINT_FILE = "checkpoint.json"

# Settings that may change between an interrupted run and its resumption
# without changing what the remaining epochs compute.
RESUMABLE_CHANGES = {"epochs", "resume", "tolerance", "device", "x_products"}


def save_row_block(table: FactorTable, block: int, rows: RowBlock) -> None:
    """Write one row block (vectors, bias, optimiser state) of ``table`` (runs on a worker)."""
    bias = None if rows.bias is None else rows.bias.numpy()
    write_factor_block(table, block, rows.vectors.numpy(), bias)
    if rows.state:
        arrays: dict[str, np.ndarray] = {}
        for index, entry in rows.state.items():
            for name, value in entry.items():
                kind = "tensor" if isinstance(value, torch.Tensor) else "int"
                arrays[f"{index}.{name}.{kind}"] = np.asarray(
                    value.numpy() if isinstance(value, torch.Tensor) else value
                )
        save_arrays(join(table.directory, f"block-{block:05d}.state.npz"), arrays)


def load_row_block(table: FactorTable, block: int) -> RowBlock:
    """Read one row block written by :func:`save_row_block` (runs on a worker)."""
    vectors, bias = table.read_block(block)
    state: OptimizerState = {}
    arrays = load_arrays(join(table.directory, f"block-{block:05d}.state.npz"))
    for key, array in (arrays or {}).items():
        index, name, kind = key.split(".")
        value: Any = torch.from_numpy(array.copy()) if kind == "tensor" else int(array)
        state.setdefault(int(index), {})[name] = value
    return RowBlock(
        vectors=torch.from_numpy(vectors.copy()),
        bias=None if bias is None else torch.from_numpy(bias.copy()),
        state=state,
    )


class Checkpoint(BaseModel):
    """What ``checkpoint.json`` records: enough to continue exactly where a run stopped."""

    epoch: int
    history: list[EpochRecord]
    settings: dict[str, Any]
    tables: list[FactorTable]


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@dataclass
class PendingCheckpoint:
    """An epoch whose blocks are being saved under ``partial`` and that is not yet published."""

    client: Client
    epoch: int
    history: list[EpochRecord]
    tables: list[FactorTable]
    saves: list[Future]
    partial: str


class CheckpointStore:
    """The checkpoints of one model's training under ``<work>/checkpoints/<model>`` (a path or URL)."""

    def __init__(self, directory: str | Path, settings: TrainSettings, keep: int = 2) -> None:
        self.directory = str(directory)
        self.settings = settings
        self.keep = keep
        self._pending: PendingCheckpoint | None = None

    def _epoch_dir(self, epoch: int) -> str:
        return join(self.directory, f"epoch-{epoch:05d}")

    def clear(self) -> None:
        delete_prefix(self.directory)

    def write(
        self,
        client: Client,
        epoch: int,
        history: list[EpochRecord],
        blocks: dict[str, tuple[FactorTable, list[Future]]],
    ) -> None:
        """Start saving every factor block of ``blocks`` (table name → (layout, futures)) for ``epoch``.

        The previous epoch's checkpoint is completed first; this one is
        completed by the next call or by :meth:`complete`.
        """
        self.complete()
        # No rename on an object store: the epoch is written in place, and
        # is complete once checkpoint.json is there.
        remote = is_remote(self.directory)
        partial = self._epoch_dir(epoch) if remote else join(self.directory, f".epoch-{epoch:05d}.partial")
        delete_prefix(partial)
        tables = []
        saves = []
        for name, (layout, futures) in blocks.items():
            table = layout.model_copy(update={"directory": join(partial, name)})
            tables.append(table)
            # Below the next epoch's updates, which become ready at the same
            # moment: the saves fill the gaps instead of delaying a half-step.
            saves += [
                client.submit(save_row_block, table, b, rows, priority=-1) for b, rows in enumerate(futures)
            ]
        self._pending = PendingCheckpoint(client, epoch, list(history), tables, saves, partial)

    def complete(self) -> None:
        """Wait for the started checkpoint's blocks, then publish it: checkpoint.json, rename, prune."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pending.client.gather(pending.saves)
        final = self._epoch_dir(pending.epoch)
        checkpoint = Checkpoint(
            epoch=pending.epoch,
            history=pending.history,
            settings=self.settings.model_dump(mode="json"),
            tables=[t.model_copy(update={"directory": join(final, t.name)}) for t in pending.tables],
        )
        write_bytes(
            join(pending.partial, CHECKPOINT_FILE),
            checkpoint.model_dump_json(indent=1).encode(),
            durable=True,
        )
        if not is_remote(self.directory):
            delete_prefix(final)
            os.rename(pending.partial, final)
            _fsync_directory(Path(self.directory))
        for old in self.completed_epochs()[: -self.keep]:
            delete_prefix(self._epoch_dir(old))

    def completed_epochs(self) -> list[int]:
        return sorted(
            int(name.removeprefix("epoch-"))
            for name in list_names(self.directory)
            if name.startswith("epoch-") and exists(join(self.directory, name, CHECKPOINT_FILE))
        )

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, after checking it was made with compatible settings."""
        epochs = self.completed_epochs()
        if not epochs:
            return None
        path = join(self._epoch_dir(epochs[-1]), CHECKPOINT_FILE)
        checkpoint = Checkpoint.model_validate_json(read_bytes(path))
        current = self.settings.model_dump(mode="json")
        changed = sorted(
            key
            for key in set(current) | set(checkpoint.settings)
            if key not in RESUMABLE_CHANGES and current.get(key) != checkpoint.settings.get(key)
        )
        if changed:
            details = ", ".join(f"{k} {checkpoint.settings.get(k)!r} → {current.get(k)!r}" for k in changed)
            raise ConfigError(
                f"cannot --resume from {path}: it was written with different settings ({details}); "
                "run without --resume to start over"
            )
        return checkpoint


def load_blocks(client: Client, table: FactorTable, resources: dict[str, float] | None) -> list[Future]:
    """Futures of every row block of a stored table, read on the workers."""
    return [
        client.submit(load_row_block, table, block, resources=resources, pure=False)
        for block in range(table.grid.n_blocks)
    ]
