"""Every registered model × solver trained on two devices from the same seed, and the results compared.

The reference device is the CPU; the candidate is CUDA on a GPU machine (the
CPU again in a dry run, where both runs must agree exactly). Both runs use the
same ingested data, the same cluster and the same settings, so the only
difference is where the tensors live and which kernels (and summation orders)
compute them.

Tolerances, float32 throughout: the final loss within :data:`LOSS_RTOL`
relative, and every published table (vectors, and biases where the model has
them) within :data:`TABLE_RTOL` in relative Frobenius norm,
‖A_candidate − A_cpu‖_F / ‖A_cpu‖_F. Rounding alone moves a float32 sum by
about 1e-7 relative per operation; a few epochs of contracting ALS or NMF
steps keep it near that, and Adam's per-coordinate normalisation can amplify it
where a gradient is close to zero, hence the wider table bound.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mf_dist.registry import MODELS
from mf_dist.settings import TrainSettings

LOSS_RTOL = 1e-3
TABLE_RTOL = 1e-2

# The data every case trains on: a few blocks on each side, small enough for seconds per case.
N_RATINGS, N_USERS, N_ITEMS, SEED = 20_000, 400, 1_500, 7
BLOCK_SIZE = 256
LIKE_THRESHOLD = 4.0
INTERCEPT = 3.86

EPOCHS = {"cooccurrence": 12, "explicit": 4, "implicit": 4, "nmf": 10}
LEARNING_RATES = {
    ("cooccurrence", "gradient"): 0.1,
    ("explicit", "gradient"): 0.01,
    ("implicit", "gradient"): 0.05,
    ("nmf", "gradient"): 1.0,
}
# Their ALS trainers read settings.als_method (cooccurrence's does not): both row solves are cases.
ALS_METHOD_MODELS = ("explicit", "implicit")
# NMF factors X = SᵀS (items, contexts) or S itself (users, items): two code paths.
NMF_TARGETS = ("cooccurrence", "ratings")


@dataclass(frozen=True)
class Case:
    """One model × solver (× ALS row solve, × NMF target) to train on both devices."""

    model: str
    solver: str
    options: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return "/".join([self.model, self.solver, *(value for _, value in self.options)])

    def settings(self, device: str) -> TrainSettings:
        return TrainSettings(
            model=self.model,
            solver=self.solver,
            rank=8,
            epochs=EPOCHS.get(self.model, 4),
            learning_rate=LEARNING_RATES.get((self.model, self.solver), 0.05),
            regularization=0.05,
            batch_size=64,
            seed=0,
            tolerance=0.0,
            device=device,
            **dict(self.options),
        )


def parity_cases() -> list[Case]:
    """Every solver of every registered model; ALS row solves and NMF targets are cases of their own."""
    cases = []
    for spec in MODELS.values():
        for solver in spec.solvers:
            if solver == "als" and spec.name in ALS_METHOD_MODELS:
                cases += [Case(spec.name, solver, (("als_method", method),)) for method in ("cg", "cholesky")]
            elif spec.name == "nmf":
                cases += [Case(spec.name, solver, (("target", target),)) for target in NMF_TARGETS]
            else:
                cases.append(Case(spec.name, solver))
    return cases


@dataclass
class Comparison:
    """One case on both devices: losses, table differences, and whether they are within the tolerances."""

    case: str
    reference_device: str
    candidate_device: str
    epochs: int
    reference_loss: float
    candidate_loss: float
    loss_rel_diff: float
    history_max_rel_diff: float
    table_rel_diffs: dict[str, float] = field(default_factory=dict)
    reference_seconds: float = 0.0
    candidate_seconds: float = 0.0
    passed: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def relative_difference(candidate: np.ndarray, reference: np.ndarray) -> float:
    """‖candidate − reference‖_F / ‖reference‖_F in float64 (the absolute norm where the reference is 0)."""
    candidate64, reference64 = np.asarray(candidate, np.float64), np.asarray(reference, np.float64)
    if candidate64.shape != reference64.shape:
        return math.inf
    difference = float(np.linalg.norm(candidate64 - reference64))
    scale = float(np.linalg.norm(reference64))
    return difference / scale if scale > 0 else difference


def compare_runs(
    case: str,
    devices: tuple[str, str],
    histories: tuple[list[float], list[float]],
    tables: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
    seconds: tuple[float, float] = (0.0, 0.0),
) -> Comparison:
    """The comparison of two runs of one case: (reference, candidate) for each argument."""
    reference_history, candidate_history = histories
    steps = [
        abs(b - a) / max(abs(a), 1e-30) for a, b in zip(reference_history, candidate_history, strict=False)
    ]
    same_length = len(reference_history) == len(candidate_history)
    history_diff = max(steps, default=0.0) if same_length else math.inf
    loss_diff = steps[-1] if steps and same_length else math.inf
    reference_tables, candidate_tables = tables
    table_diffs = {
        name: relative_difference(candidate_tables.get(name, np.empty(0)), values)
        for name, values in reference_tables.items()
    }
    finite = all(math.isfinite(x) for x in [*reference_history, *candidate_history])
    passed = (
        finite
        and set(reference_tables) == set(candidate_tables)
        and loss_diff <= LOSS_RTOL
        and all(diff <= TABLE_RTOL for diff in table_diffs.values())
    )
    return Comparison(
        case=case,
        reference_device=devices[0],
        candidate_device=devices[1],
        epochs=len(reference_history),
        reference_loss=reference_history[-1] if reference_history else math.nan,
        candidate_loss=candidate_history[-1] if candidate_history else math.nan,
        loss_rel_diff=loss_diff,
        history_max_rel_diff=history_diff,
        table_rel_diffs=table_diffs,
        reference_seconds=seconds[0],
        candidate_seconds=seconds[1],
        passed=passed,
    )


def prepare_parity_data(client: object, directory: Path) -> Path:
    """Generate and ingest the parity set (likes at 4, X = SᵀS tiles) under ``directory``; its work dir."""
    from mf_dist.bench.synthetic import synthetic_ratings, write_partitions
    from mf_dist.stages.cooccur import cooccurrence_blocks
    from mf_dist.stages.ingest import ingest_ratings

    shutil.rmtree(directory / "input", ignore_errors=True)
    shutil.rmtree(directory / "work", ignore_errors=True)
    frame = synthetic_ratings(N_RATINGS, n_users=N_USERS, n_items=N_ITEMS, intercept=INTERCEPT, seed=SEED)
    source = directory / "input"
    write_partitions(frame, source, n_files=2)
    work = directory / "work"
    ingest = ingest_ratings(
        client, str(source), work, like_threshold=LIKE_THRESHOLD, block_size=BLOCK_SIZE, seed=0
    )
    cooccurrence_blocks(client, ingest, work)
    return work


def _tables(result: object) -> dict[str, np.ndarray]:
    """Every published table of a result, vectors and biases, in memory (the next run overwrites them)."""
    tables = {}
    for table in result.tables:
        blocks = [table.read_block(block) for block in range(table.grid.n_blocks)]
        tables[table.name] = np.concatenate([vectors for vectors, _ in blocks])
        if table.has_bias:
            tables[f"{table.name}.bias"] = np.concatenate([bias for _, bias in blocks])
    return tables


def train_on(client: object, work: Path, case: Case, device: str) -> tuple[list[float], dict, float]:
    """(loss history, tables, seconds) of one case on one device."""
    from mf_dist.stages.train import train_factors

    started = time.perf_counter()
    result = train_factors(client, work, case.settings(device))
    seconds = time.perf_counter() - started
    return [record.loss for record in result.history], _tables(result), seconds


def compare_devices(
    client: object,
    work: Path,
    candidate: str,
    cases: list[Case] | None = None,
    reference: str = "cpu",
    on_case: object = None,
) -> list[Comparison]:
    """Train every case on ``reference`` then ``candidate``; one :class:`Comparison` per case.

    ``on_case(comparison)``, if given, is called after each case (progress).
    """
    comparisons = []
    for case in cases or parity_cases():
        reference_run = train_on(client, work, case, reference)
        candidate_run = train_on(client, work, case, candidate)
        comparison = compare_runs(
            case.label,
            (reference, candidate),
            (reference_run[0], candidate_run[0]),
            (reference_run[1], candidate_run[1]),
            (reference_run[2], candidate_run[2]),
        )
        comparisons.append(comparison)
        if on_case is not None:
            on_case(comparison)
    return comparisons
