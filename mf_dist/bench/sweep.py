"""Cross-validated sweep of training settings: how the models' defaults were chosen (issue 17).

    python -m mf_dist.bench.sweep --data ../shared/data/ml-100k.tsv --grid implicit --folds 5
    python -m mf_dist.bench.sweep --data synthetic:tiny --grid check --folds 5

The ratings are cut into ``--folds`` folds by a seeded permutation; for each
fold the other folds go through the pipeline's own ingest (likes at rating ≥
4), co-occurrence and train stages on a local Dask cluster, and the held-out
fold is scored by the functions of :mod:`mf_dist.stages.evaluation`, the ones
``--holdout`` runs use:

- ``explicit``: RMSE of the predicted ratings (:func:`explicit_block_errors`);
- ``implicit`` (and any model with user vectors): recall@10 and NDCG@10 of the
  held-out likes, the user's training likes excluded (:func:`ranking_block_metrics`);
- ``cooccurrence`` and ``nmf`` (item vectors only): the same metrics for the
  item-to-item recommender score(u, i) = Σ over u's training likes j of
  cos(v_i, v_j), which is :func:`ranking_block_metrics`' profile rule on
  unit-length item vectors; ``itemknn`` is that rule on the liked matrix's own
  columns (plain cosine item-kNN, the baseline the learned vectors must reach).

Held-out ratings of users or items absent from a fold's training part are
left out (nothing can score them). Every (candidate, fold) is one JSON line
in ``--out``, written as it finishes; the summary is the mean ± standard
deviation over the folds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from distributed import Client

from mf_dist.bench.scales import DATA_SEED, LIKE_THRESHOLD, RATING_INTERCEPT, SCALES
from mf_dist.bench.synthetic import synthetic_ratings
from mf_dist.registry import model_spec
from mf_dist.runtime.cluster import open_client
from mf_dist.settings import TrainSettings
from mf_dist.stages.cooccur import cooccurrence_blocks
from mf_dist.stages.evaluation import explicit_block_errors, ranking_block_metrics
from mf_dist.stages.ingest import ingest_ratings
from mf_dist.stages.train import train_factors
from mf_dist.storage.factor_files import FactorTable, TrainResult, write_factor_block
from mf_dist.storage.ingested import IngestResult

logger = logging.getLogger(__name__)

K = 10
COLUMNS = ["user_id", "item_id", "rating", "timestamp"]


@dataclass(frozen=True)
class Candidate:
    """One configuration: the settings a run would be given (model and solver included)."""

    settings: dict[str, Any]

    @property
    def label(self) -> str:
        return " ".join(f"{key}={value}" for key, value in self.settings.items())


def product(model: str, **axes: list[Any]) -> list[Candidate]:
    """Every combination of the ``axes`` values for ``model`` (each axis a setting name)."""
    names = list(axes)
    return [
        Candidate({"model": model, **dict(zip(names, values, strict=True))})
        for values in itertools.product(*(axes[name] for name in names))
    ]


def defaults(model: str, **settings: Any) -> Candidate:
    """The model's defaults as a run gets them today, with ``settings`` on top."""
    return Candidate({"model": model, **settings})


# The previous defaults (before issue 17), spelled out so the comparison
# stays the same after the registry changes.
OLD_DEFAULTS = {
    "implicit": {
        "solver": "als",
        "rank": 32,
        "epochs": 15,
        "regularization": 0.1,
        "alpha": 10.0,
        "confidence": "linear",
    },
    "cooccurrence": {
        "solver": "gradient",
        "rank": 32,
        "epochs": 60,
        "learning_rate": 0.1,
        "regularization": 0.0,
    },
    "nmf": {"solver": "mu", "rank": 32, "epochs": 200},
    "explicit": {"solver": "als", "rank": 64, "epochs": 20, "regularization": 0.12},
}


def _old(model: str) -> Candidate:
    return Candidate({"model": model, **OLD_DEFAULTS[model], "tag": "old default"})


GRIDS: dict[str, list[Candidate]] = {
    # Round 1: confidence × α × λ at the default rank (32), ALS, 15 epochs.
    "implicit": [
        _old("implicit"),
        *product(
            "implicit",
            confidence=["binary"],
            alpha=[1.0, 2.5, 5.0, 10.0, 20.0],
            regularization=[0.1, 1.0, 10.0],
        ),
        *product(
            "implicit",
            confidence=["linear"],
            alpha=[0.5, 1.0, 2.5, 5.0],
            regularization=[0.1, 1.0, 10.0],
        ),
        *product(
            "implicit",
            confidence=["log"],
            alpha=[2.5, 5.0, 10.0, 20.0],
            confidence_epsilon=[1.0],
            regularization=[0.1, 1.0, 10.0],
        ),
    ],
    # Round 2, around round 1's best corner (small α, large λ): smaller α, larger λ, then rank 64,
    # longer training and the gradient solver at the best.
    "implicit-2": [
        *product("implicit", confidence=["binary"], alpha=[0.25, 0.5, 1.0], regularization=[30.0]),
        *product("implicit", confidence=["binary"], alpha=[0.5], regularization=[10.0]),
        *product("implicit", confidence=["linear"], alpha=[0.25], regularization=[10.0, 30.0]),
        *product("implicit", confidence=["log"], alpha=[1.0], regularization=[10.0, 30.0]),
        *product("implicit", confidence=["binary"], alpha=[1.0], regularization=[10.0], rank=[64]),
        *product(
            "implicit",
            confidence=["binary"],
            alpha=[1.0],
            regularization=[10.0],
            epochs=[30],
            tolerance=[0.0],
        ),
        *product("implicit", solver=["gradient"], confidence=["binary"], alpha=[1.0], regularization=[10.0]),
        *product(
            "implicit",
            solver=["gradient"],
            confidence=["binary"],
            alpha=[1.0],
            regularization=[10.0],
            learning_rate=[0.05],
            epochs=[60],
        ),
    ],
    # Co-occurrence ALS has no regularization term (X's counts pin the scale).
    "cooccurrence": [
        _old("cooccurrence"),
        Candidate({"model": "itemknn"}),
        *product("cooccurrence", solver=["als"], rank=[32, 64], epochs=[5, 10, 30]),
        *product("cooccurrence", solver=["gradient"], rank=[64], epochs=[60, 200]),
    ],
    "nmf": [
        _old("nmf"),
        Candidate({"model": "itemknn"}),
        *product("nmf", solver=["mu"], rank=[32], epochs=[50]),
        *product("nmf", solver=["mu"], rank=[64], epochs=[200]),
        *product("nmf", solver=["gradient"], rank=[32], epochs=[200]),
        Candidate({"model": "nmf", "target": "ratings"}),
    ],
    # An earlier single-split search (docs/benchmarks.md, "Rating prediction") bracketed λ at
    # 0.10-0.15 and found rank 64 = 128; the tolerance (1e-4) stops ALS near epoch 15, so more
    # epochs only matter with tolerance 0.
    "explicit": [
        _old("explicit"),
        *product("explicit", solver=["als"], rank=[64], regularization=[0.08, 0.1, 0.15]),
        *product("explicit", solver=["als"], rank=[32, 128], regularization=[0.12]),
        *product("explicit", solver=["als"], rank=[64], regularization=[0.12], epochs=[40], tolerance=[0.0]),
        *product("explicit", solver=["gradient"], rank=[64]),
    ],
}


# The previous defaults against today's (the registry's), model by model, with the item-kNN
# baseline: run on the sweep's data and on a second, differently shaped set.
GRIDS["check"] = [
    candidate
    for model in ("implicit", "cooccurrence", "nmf", "explicit")
    for candidate in (_old(model), Candidate({"model": model, "tag": "new default"}))
] + [Candidate({"model": "itemknn"})]


# --- Data and folds ------------------------------------------------------------------------------


def read_ratings(source: str) -> pd.DataFrame:
    """The ratings of ``source``: ``synthetic:<scale>`` (the bench generator), Parquet, or TSV/CSV.

    A text file's first four columns are user, item, rating, timestamp; a
    header row (MovieLens 100K's ``user_id:token`` …) is recognised by a
    non-numeric first field.
    """
    if source.startswith("synthetic:"):
        scale = SCALES[source.split(":", 1)[1]]
        return synthetic_ratings(
            scale.n_ratings,
            n_users=scale.n_users,
            n_items=scale.n_items,
            intercept=RATING_INTERCEPT,
            seed=DATA_SEED,
        )
    path = Path(source)
    if path.suffix == ".parquet" or path.is_dir():
        frame = pd.read_parquet(path)
    else:
        separator = "\t" if path.suffix in (".tsv", ".data", "") else ","
        first = path.open().readline().split(separator)[0]
        header = 0 if not first.strip().lstrip("-").isdigit() else None
        frame = pd.read_csv(path, sep=separator, header=header)
    frame = frame.iloc[:, :4]
    frame.columns = COLUMNS[: frame.shape[1]]
    return frame.astype({"user_id": "int64", "item_id": "int64", "rating": "float32"})


def block_size_for(source: str) -> int:
    """The scale's block size for a synthetic set (several blocks); the pipeline's default otherwise."""
    if source.startswith("synthetic:"):
        return SCALES[source.split(":", 1)[1]].block_size
    return 4096


def fold_of(n_rows: int, folds: int, seed: int) -> np.ndarray:
    """Each row's fold, 0..folds-1: a seeded permutation dealt round-robin (fold sizes differ by ≤ 1)."""
    order = np.random.default_rng(seed).permutation(n_rows)
    assignment = np.empty(n_rows, np.int64)
    assignment[order] = np.arange(n_rows) % folds
    return assignment


@dataclass
class Fold:
    """One fold's training work directory (ingested) and its held-out ratings in index space."""

    index: int
    work_dir: Path
    ingest: IngestResult
    holdout_paths: list[Path]
    liked: sp.csr_matrix
    """The training likes, users × items (1 per like), for the ``itemknn`` baseline."""
    has_cooccurrence: bool = field(default=False)


def prepare_fold(
    client: Client, frame: pd.DataFrame, held: np.ndarray, index: int, root: Path, block_size: int
) -> Fold:
    """Ingest the training part of fold ``index`` and write its held-out part per user block."""
    directory = root / f"fold-{index}"
    shutil.rmtree(directory, ignore_errors=True)
    (directory / "input").mkdir(parents=True)
    train, test = frame[~held], frame[held]
    pq.write_table(pa.Table.from_pandas(train, preserve_index=False), directory / "input" / "train.parquet")
    ingest = ingest_ratings(
        client,
        str(directory / "input"),
        directory / "work",
        like_threshold=LIKE_THRESHOLD,
        block_size=block_size,
    )
    users = pq.read_table(ingest.users_path).to_pandas()
    items = pq.read_table(ingest.items_path).to_pandas()
    user_rows = pd.Index(users["user_id"]).get_indexer(test["user_id"])
    item_rows = pd.Index(items["item_id"]).get_indexer(test["item_id"])
    # users.parquet / items.parquet list ids with their row ("index").
    user_rows = np.where(user_rows >= 0, users["index"].to_numpy()[user_rows], -1)
    item_rows = np.where(item_rows >= 0, items["index"].to_numpy()[item_rows], -1)
    known = (user_rows >= 0) & (item_rows >= 0)
    scored = pd.DataFrame(
        {
            "user": user_rows[known].astype(np.int64),
            "item": item_rows[known].astype(np.int64),
            "rating": test["rating"].to_numpy(np.float32)[known],
        }
    )
    paths = []
    for block, start, stop in ingest.user_grid:
        rows = scored[(scored.user >= start) & (scored.user < stop)]
        path = directory / "held" / f"block-{block:05d}.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), path)
        paths.append(path)
    liked = train[train.rating >= LIKE_THRESHOLD]
    u = users["index"].to_numpy()[pd.Index(users["user_id"]).get_indexer(liked["user_id"])]
    i = items["index"].to_numpy()[pd.Index(items["item_id"]).get_indexer(liked["item_id"])]
    matrix = sp.csr_matrix((np.ones(len(u)), (u, i)), shape=(ingest.n_users, ingest.n_items))
    return Fold(index, directory / "work", ingest, paths, matrix)


# --- Scoring: the evaluation module's functions --------------------------------------------------


def rating_errors(fold: Fold, trained: TrainResult) -> dict[str, float]:
    """Held-out RMSE and MAE of an explicit model (:func:`explicit_block_errors` per user block)."""
    users, items = trained.table("users"), trained.table("items")
    assert trained.global_mean is not None
    sums = [
        explicit_block_errors(str(path), users, block, items, trained.global_mean)
        for block, path in enumerate(fold.holdout_paths)
    ]
    n = max(1, sum(s[2] for s in sums))
    return {"rmse": float(np.sqrt(sum(s[0] for s in sums) / n)), "mae": sum(s[1] for s in sums) / n}


def ranking(
    fold: Fold, users: FactorTable | None, profile: FactorTable, candidates: FactorTable
) -> dict[str, float]:
    """Held-out recall@10 and NDCG@10 by :func:`ranking_block_metrics` over the user blocks."""
    sums = [
        ranking_block_metrics(
            str(path),
            str(fold.ingest.ratings_path(block)),
            start,
            stop - start,
            fold.ingest.like_threshold,
            users,
            block,
            profile,
            candidates,
            K,
        )
        for (block, start, stop), path in zip(fold.ingest.user_grid, fold.holdout_paths, strict=True)
    ]
    n = max(1, sum(s[2] for s in sums))
    return {f"recall@{K}": sum(s[0] for s in sums) / n, f"ndcg@{K}": sum(s[1] for s in sums) / n}


def unit_table(vectors: np.ndarray, directory: Path, block_size: int) -> FactorTable:
    """``vectors`` scaled to unit length (zero rows stay zero), written as a factor table."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    shutil.rmtree(directory, ignore_errors=True)
    table = FactorTable(
        name="items",
        directory=str(directory),
        n_rows=len(unit),
        block_size=block_size,
        rank=unit.shape[1],
        has_bias=False,
    )
    for block, start, stop in table.grid:
        write_factor_block(table, block, unit[start:stop], None)
    return table


def item_knn(fold: Fold, vectors: np.ndarray) -> dict[str, float]:
    """Held-out metrics of score(u, i) = Σ_{j liked by u} cos(v_i, v_j)."""
    table = unit_table(vectors, fold.work_dir / "sweep-unit-items", fold.ingest.block_size)
    return ranking(fold, None, table, table)


def read_vectors(table: FactorTable) -> np.ndarray:
    return np.concatenate([table.read_block(b)[0] for b in range(table.grid.n_blocks)])


# --- The sweep -----------------------------------------------------------------------------------


def train_settings(candidate: Candidate) -> TrainSettings:
    values = {key: value for key, value in candidate.settings.items() if key != "tag"}
    return TrainSettings(device="cpu", seed=0, **values)


def evaluate(client: Client, fold: Fold, candidate: Candidate) -> dict[str, Any]:
    """Fit ``candidate`` on the fold's training part and score its held-out part."""
    model = candidate.settings["model"]
    if model == "itemknn":
        started = time.perf_counter()
        columns = fold.liked.T.toarray()
        metrics = item_knn(fold, columns)
        return {**metrics, "seconds": time.perf_counter() - started, "epochs": 0}
    settings = train_settings(candidate)
    spec = model_spec(model)
    if spec.needs_cooccurrence(settings.target) and not fold.has_cooccurrence:
        cooccurrence_blocks(client, fold.ingest, fold.work_dir)
        fold.has_cooccurrence = True
    started = time.perf_counter()
    trained = train_factors(client, fold.work_dir, settings)
    seconds = time.perf_counter() - started
    names = {table.name for table in trained.tables}
    if spec.holdout_metric == "rating_errors":
        metrics = rating_errors(fold, trained)
    elif "users" in names:
        users, items = trained.table("users"), trained.table("items")
        metrics = ranking(fold, users, items, items)
    else:
        metrics = item_knn(fold, read_vectors(trained.table("items")))
    return {**metrics, "seconds": seconds, "epochs": trained.history[-1].epoch}


def run_sweep(
    source: str, candidates: list[Candidate], folds: int, seed: int, out: Path, workers: int
) -> list[dict[str, Any]]:
    """Every candidate on every fold, fold by fold; each result appended to ``out`` as it comes."""
    frame = read_ratings(source)
    assignment = fold_of(len(frame), folds, seed)
    records = []
    with (
        tempfile.TemporaryDirectory(prefix="mf-dist-sweep-") as scratch,
        open_client(workers=workers) as client,
    ):
        for index in range(folds):
            fold = prepare_fold(
                client, frame, assignment == index, index, Path(scratch), block_size_for(source)
            )
            for candidate in candidates:
                result = evaluate(client, fold, candidate)
                record = {
                    "data": source,
                    "fold": index,
                    "folds": folds,
                    "settings": candidate.settings,
                    **result,
                }
                records.append(record)
                with out.open("a") as stream:
                    stream.write(json.dumps(record) + "\n")
                logger.info("fold %d  %s  %s", index, candidate.label, _brief(result))
    return records


def _brief(result: dict[str, Any]) -> str:
    return "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over the folds per (data, settings), in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(json.dumps([record["data"], record["settings"]]), []).append(record)
    rows = []
    for group in groups.values():
        row: dict[str, Any] = {
            "data": group[0]["data"],
            "settings": group[0]["settings"],
            "folds": len(group),
        }
        for metric in ("rmse", "mae", f"recall@{K}", f"ndcg@{K}", "seconds", "epochs"):
            values = [record[metric] for record in group if metric in record]
            if values:
                row[metric] = float(np.mean(values))
                row[metric + "_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table: settings, then each metric's fold mean ± sd."""
    metrics = [m for m in ("rmse", f"recall@{K}", f"ndcg@{K}") if any(m in row for row in rows)]
    lines = [
        "| settings | " + " | ".join(metrics) + " | fit s | epochs |",
        "| --- | " + " | ".join("---" for _ in metrics) + " | --- | --- |",
    ]
    for row in rows:
        label = " ".join(f"{k}={v}" for k, v in row["settings"].items())
        cells = [f"{row[m]:.4f} ± {row[m + '_sd']:.4f}" if m in row else "" for m in metrics]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['seconds']:.1f} | {row['epochs']:.0f} |")
    return "\n".join(lines)


def parse_candidates(grids: list[str], extra: list[str]) -> Iterator[Candidate]:
    for name in grids:
        yield from GRIDS[name]
    for text in extra:
        yield Candidate(json.loads(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mf_dist.bench.sweep", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", default="../shared/data/ml-100k.tsv", help="ratings file, or synthetic:<scale>"
    )
    parser.add_argument("--grid", action="append", default=[], choices=sorted(GRIDS), help="a named grid")
    parser.add_argument("--candidate", action="append", default=[], help='one more, as JSON: {"model": ...}')
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("sweep.jsonl"), help="JSON lines, appended")
    parser.add_argument("--summary", action="store_true", help="only summarize --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.summary:
        records = [json.loads(line) for line in args.out.open()]
    else:
        candidates = list(parse_candidates(args.grid, args.candidate))
        if not candidates:
            parser.error("name at least one --grid or --candidate")
        started = time.perf_counter()
        records = run_sweep(args.data, candidates, args.folds, args.seed, args.out, args.workers)
        logger.info("sweep wall time %.0f s", time.perf_counter() - started)
    print(markdown(summarize(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
