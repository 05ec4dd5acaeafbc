"""The benchmark suites: our stage functions against a reference, on the same prepared data.

Every ``ours`` side starts a real local Dask cluster of worker processes
(:func:`mf_dist.runtime.cluster.open_client`) and times only the stage it is about;
every ``reference`` side reads the same ingested blocks (the same likes, the
same hashed train/held-out split) and times only the reference's fit or
product. Quality figures are computed the same way for both sides.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from distributed import Client

from mf_dist.bench import recommend as recommend_suite
from mf_dist.bench.data import (
    many_items_dir,
    most_liked_items_dir,
    prepared_work_dir,
    ratings_dir,
)
from mf_dist.bench.measure import SideContext, Timed, stopwatch
from mf_dist.bench.scales import LIKE_THRESHOLD, Scale
from mf_dist.blocks import BlockGrid
from mf_dist.counting import pair_counts
from mf_dist.models import nmf as nmf_objective
from mf_dist.models.cooccurrence import initial_scale
from mf_dist.registry import MODELS, model_spec
from mf_dist.runtime.cluster import open_client
from mf_dist.settings import TrainSettings
from mf_dist.solvers import weighted_cg, weighted_cholesky
from mf_dist.stages.cooccur import cooccurrence_blocks
from mf_dist.stages.evaluation import holdout_metrics, ranking_block_metrics
from mf_dist.stages.train import train_factors
from mf_dist.storage.factor_files import EpochRecord, FactorTable, TrainResult, block_seed, write_factor_block
from mf_dist.storage.ingested import IngestResult, load_ingest_result
from mf_dist.storage.store import exists, read_table
from mf_dist.storage.tiles import load_cooccurrence_result
from mf_dist.trainers.liked_products import choose_x_products

HOLDOUT_SHARE = 0.2
# A CUDA side runs one worker per GPU, so "the cores our side uses" would give
# a CPU reference one core; the GPU check sets this to the machine's cores instead.
REFERENCE_THREADS_VARIABLE = "MF_DIST_BENCH_REFERENCE_THREADS"

Variant = dict[str, int | float | str]
"""One variant's settings (``{"rank": 64}``); they label its table row and its side files."""


@dataclass(frozen=True)
class Suite:
    """One comparison: how to prepare its data, our side, the reference side, and the target."""

    name: str
    target: str
    variants: list[Variant]
    prepare: Callable[[Path, Scale, int, Variant], tuple[Path, Path]]
    """(cache dir, scale, workers, variant) → (input dir, ingested work dir), both sides' data."""
    ours: Callable[[SideContext], Timed]
    reference: Callable[[SideContext], Timed] | None
    reference_unavailable: Callable[[], str | None] = lambda: None
    """Why the reference cannot run here (a missing optional dependency), or None."""
    ours_unavailable: Callable[[], str | None] = lambda: None
    """Why our side cannot run in this version, or None."""
    variant_reference_unavailable: Callable[[Variant], str | None] = lambda variant: None
    """Why the reference cannot run on one variant even where it is installed (its size), or None."""
    variant_target: Callable[[Variant], str | None] = lambda variant: None
    """One variant's target where it differs from ``target``, or None."""


def iterations_for(scale: str, small: int, tiny: int = 2) -> int:
    """Iterations per scale: CI's tiny runs only prove the command works."""
    return tiny if scale == "tiny" else small


# --- shared helpers --------------------------------------------------------------------------


def _ingest(context: SideContext) -> IngestResult:
    return load_ingest_result(context.work_dir)


def liked_matrix(ingest: IngestResult, *, held_out: bool = False) -> sp.csr_matrix:
    """S (users × items, CSR) of the ingested training likes, or of the held-out ones."""
    users, items, ratings = [], [], []
    for block in range(ingest.user_grid.n_blocks):
        path = ingest.holdout_path(block) if held_out else ingest.ratings_path(block)
        if not exists(path):
            continue
        table = read_table(path)
        users.append(table["user"].to_numpy())
        items.append(table["item"].to_numpy())
        ratings.append(table["rating"].to_numpy())
    user, item, rating = (np.concatenate(parts) for parts in (users, items, ratings))
    liked = rating >= LIKE_THRESHOLD
    return sp.csr_matrix(
        (rating[liked].astype(np.float32), (user[liked], item[liked])), shape=(ingest.n_users, ingest.n_items)
    )


def _settings(context: SideContext, model: str, solver: str, **overrides: object) -> TrainSettings:
    defaults = model_spec(model).defaults
    values: dict[str, object] = {
        "model": model,
        "solver": solver,
        "rank": defaults.rank,
        "epochs": defaults.epochs,
        "learning_rate": defaults.learning_rate,
        "regularization": defaults.regularization,
        "optimizer": defaults.optimizer,
        "batch_size": 1024,
        "tolerance": 0.0,
        "seed": 0,
        "device": context.device,
    }
    values.update(overrides)
    return TrainSettings(**values)


def _x_products_route(context: SideContext, settings: TrainSettings) -> str:
    """Where our products with X came from (tiles or likes), as the trainer chose it."""
    cooccurrence = load_cooccurrence_result(context.work_dir)
    return choose_x_products(settings.x_products, cooccurrence, _ingest(context).n_likes)


def relative_frobenius_error(x: sp.csr_matrix, w: np.ndarray, h: np.ndarray) -> float:
    """‖X − W Hᵀ‖_F / ‖X‖_F without forming W Hᵀ: ‖X‖² − 2 tr(Wᵀ X H) + ⟨WᵀW, HᵀH⟩ (float64)."""
    x64 = x.astype(np.float64)
    w64, h64 = w.astype(np.float64), h.astype(np.float64)
    norm = float(x64.multiply(x64).sum())
    cross = float(np.einsum("ik,ik->", w64, x64 @ h64))
    model = float(np.sum((w64.T @ w64) * (h64.T @ h64)))
    return float(np.sqrt(max(norm - 2 * cross + model, 0.0) / norm))


def _read_table(table: FactorTable) -> np.ndarray:
    return np.concatenate([table.read_block(b)[0] for b in range(table.grid.n_blocks)])


def _cooccurrence_matrix(ingest: IngestResult) -> sp.csr_matrix:
    """X = SᵀS of the binary likes, diagonal included (CSR, float32)."""
    liked = liked_matrix(ingest)
    liked.data[:] = 1.0
    return (liked.T.tocsr() @ liked).tocsr()


def ranking_recall(ingest: IngestResult, users: np.ndarray, items: np.ndarray, directory: Path) -> float:
    """Held-out recall@10 of reference factors, by the pipeline's own per-block metric function.

    The factors are written as factor tables with the ingest's grids, so the
    metric is :func:`mf_dist.stages.evaluation.ranking_block_metrics`, exactly what
    the pipeline computes for our model.
    """
    shutil.rmtree(directory, ignore_errors=True)
    tables = {}
    for name, vectors in (("users", users), ("items", items)):
        table = FactorTable(
            name=name,
            directory=str(directory / name),
            n_rows=len(vectors),
            block_size=ingest.block_size,
            rank=vectors.shape[1],
            has_bias=False,
        )
        for block, start, stop in table.grid:
            write_factor_block(table, block, vectors[start:stop], None)
        tables[name] = table
    recall_sum = scored = 0.0
    for block, start, stop in ingest.user_grid:
        recall, _, n = ranking_block_metrics(
            str(ingest.holdout_path(block)),
            str(ingest.ratings_path(block)),
            start,
            stop - start,
            ingest.like_threshold,
            tables["users"],
            block,
            tables["items"],
            tables["items"],
            10,
        )
        recall_sum += recall
        scored += n
    return recall_sum / max(1, scored)


def reference_threads(context: SideContext) -> int:
    """The threads a reference gets: the cores our side uses (worker processes × threads each).

    ``MF_DIST_BENCH_REFERENCE_THREADS`` overrides it (the GPU check: the whole CPU against the GPU).
    """
    if REFERENCE_THREADS_VARIABLE in os.environ:
        return int(os.environ[REFERENCE_THREADS_VARIABLE])
    processes, threads = local_layout(context)
    return processes * threads


def _limit_reference_threads(context: SideContext) -> int:
    """Limit torch and the BLAS/OpenMP pools of this process to :func:`reference_threads`; returns it."""
    count = reference_threads(context)
    torch.set_num_threads(count)
    from threadpoolctl import threadpool_limits

    threadpool_limits(count)
    return count


def warm_workers(client: Client) -> None:
    """Import the stage modules on every worker before anything is timed.

    The reference runs in a process that has imported scipy, torch and its
    library before its stopwatch starts; our workers are fresh processes,
    and their first task would otherwise pay for those imports. That
    includes ``torch._dynamo``, which torch imports when the first optimiser
    is created (1.5 s here): the dense reference creates its Adam before its
    stopwatch starts. Likewise the compiled loops (fused CG and Cholesky, pair counts) are
    compiled or loaded from numba's cache, as ``implicit``'s loop was compiled
    when it was installed.
    """
    for module in (
        "mf_dist.stages.cooccur",
        "mf_dist.stages.train",
        "mf_dist.stages.evaluation",
        "torch._dynamo",
    ):
        client.run(importlib.import_module, module)
    client.run(weighted_cg.warm_up)
    client.run(pair_counts.warm_up)
    client.run(weighted_cholesky.warm_up)


def local_layout(context: SideContext) -> tuple[int, int]:
    """(worker processes, threads each) of our local cluster on ``context.workers`` cores.

    One process per core by default. A variant with ``layout="threads"`` runs
    one process with a thread per core (``mf-dist run --workers 1
    --threads-per-worker N``): the compiled row loops release the GIL, and
    the threads share the factor blocks that processes on one machine would
    send each other every half-epoch.
    """
    if context.variant.get("layout") == "threads":
        return 1, context.workers
    return context.workers, 1


def layout_words(context: SideContext) -> str:
    processes, threads = local_layout(context)
    return f"{processes} workers" if threads == 1 else f"{processes} worker × {threads} threads"


def gpu_peak_bytes() -> int:
    """The most GPU memory torch's allocator held at once in this process (0 where CUDA never started)."""
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_initialized() else 0


def reset_gpu_peak() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def gpu_peak_details(client: Client) -> dict[str, int | str]:
    """Peak GPU memory per worker (``torch.cuda.max_memory_allocated``) as Timed details."""
    peaks = client.run(gpu_peak_bytes)
    return {
        "peak_gpu_bytes_max": max(peaks.values(), default=0),
        "peak_gpu_bytes_per_worker": ", ".join(str(peaks[worker]) for worker in sorted(peaks)),
    }


def train_ours(
    context: SideContext, settings: TrainSettings, *, with_cooccurrence: bool, evaluate: bool
) -> tuple[TrainResult, float, dict[str, float], dict[str, int | str]]:
    """Our train stage on a local cluster: (result, timed seconds, held-out metrics, device details).

    The co-occurrence stage (when the model fits X) and the held-out
    evaluation run on the same cluster but outside the timed part. On CUDA
    the details hold each worker's peak GPU memory over the training (none
    on the CPU).
    """
    ingest = _ingest(context)
    processes, threads = local_layout(context)
    with open_client(workers=processes, threads_per_worker=threads) as client:
        warm_workers(client)
        if with_cooccurrence:
            cooccurrence_blocks(client, ingest, context.work_dir)
        on_gpu = settings.device == "cuda"
        if on_gpu:
            client.run(reset_gpu_peak)
        with stopwatch() as elapsed:
            trained = train_factors(client, context.work_dir, settings)
        device_details = gpu_peak_details(client) if on_gpu else {}
        metrics = holdout_metrics(client, ingest, trained) if evaluate else {}
    return trained, elapsed[0], metrics, device_details


# --- cooccurrence: X = SᵀS --------------------------------------------------------------------


def prepare_full(cache_dir: Path, scale: Scale, workers: int, variant: Variant) -> tuple[Path, Path]:
    source = ratings_dir(cache_dir, scale)
    return source, prepared_work_dir(cache_dir, scale, source, holdout=0.0, workers=workers)


# The stage takes about a second at `small`, where run-to-run noise on a
# shared 2-core machine is ±30 %: each side is timed this many times in a
# row and its best time is reported (timeit's rule), all times in details.
COOCCURRENCE_REPEATS = 3


def cooccurrence_ours(context: SideContext) -> Timed:
    ingest = _ingest(context)
    times = []
    with open_client(workers=context.workers) as client:
        warm_workers(client)
        for _ in range(COOCCURRENCE_REPEATS):
            with stopwatch() as elapsed:
                result = cooccurrence_blocks(client, ingest, context.work_dir)
            times.append(elapsed[0])
    return Timed(
        implementation=f"cooccurrence_blocks, {context.workers} local workers, best of {len(times)}",
        seconds=min(times),
        threads=context.workers,
        quality_name="Σ X²(i≠j)",
        quality=result.offdiagonal_sum_of_squares,
        details={
            "nnz_offdiagonal": result.nnz_offdiagonal,
            "tiles": len(result.tiles),
            "runs_seconds": ", ".join(f"{t:.3f}" for t in times),
        },
    )


def cooccurrence_reference(context: SideContext) -> Timed:
    ingest = _ingest(context)
    liked = liked_matrix(ingest)
    liked.data[:] = 1
    liked = liked.astype(np.int32)
    times = []
    for _ in range(COOCCURRENCE_REPEATS):
        product = None
        with stopwatch() as elapsed:
            product = liked.T @ liked
        times.append(elapsed[0])
    product = product.tocsr()
    diagonal = product.diagonal().astype(np.float64)
    total = float((product.data.astype(np.float64) ** 2).sum() - (diagonal**2).sum())
    return Timed(
        implementation=f"scipy S.T @ S (CSR, one process), best of {len(times)}",
        seconds=min(times),
        # scipy's sparse product has no threads to give it.
        threads=1,
        quality_name="Σ X²(i≠j)",
        quality=total,
        details={
            "nnz_offdiagonal": int(product.nnz - np.count_nonzero(diagonal)),
            "runs_seconds": ", ".join(f"{t:.3f}" for t in times),
        },
    )


# --- implicit-als ---------------------------------------------------------------------------


def prepare_holdout(cache_dir: Path, scale: Scale, workers: int, variant: Variant) -> tuple[Path, Path]:
    source = ratings_dir(cache_dir, scale)
    return source, prepared_work_dir(cache_dir, scale, source, holdout=HOLDOUT_SHARE, workers=workers)


IMPLICIT_ALPHA = 10.0
IMPLICIT_REGULARIZATION = 0.1
# implicit's own default fit length (AlternatingLeastSquares(iterations=15)):
# the one-time work of a fit (ours reads and shuffles the Parquet ratings)
# is spread over the iterations a user runs.
IMPLICIT_ITERATIONS = 15


def steady_epoch_seconds(history: list[EpochRecord]) -> float:
    """The median time of an epoch after the first (which also waits for the set-up), in seconds."""
    marks = [record.seconds for record in history]
    steps = [after - before for before, after in itertools.pairwise(marks)]
    return statistics.median(steps) if steps else float("nan")


def implicit_ours(context: SideContext) -> Timed:
    rank = int(context.variant["rank"])
    settings = _settings(
        context,
        "implicit",
        "als",
        rank=rank,
        epochs=iterations_for(context.scale, IMPLICIT_ITERATIONS),
        alpha=IMPLICIT_ALPHA,
        # The reference below is given c = 1 + α·r as its values: the same objective only with linear.
        confidence="linear",
        regularization=IMPLICIT_REGULARIZATION,
    )
    trained, seconds, metrics, device_details = train_ours(
        context, settings, with_cooccurrence=False, evaluate=True
    )
    return Timed(
        implementation=f"implicit/als (CG, 3 steps), k={rank}, {layout_words(context)}",
        seconds=seconds,
        threads=reference_threads(context),
        iterations=trained.epochs,
        quality_name="recall@10",
        quality=metrics["holdout_recall@10"],
        details={
            "ndcg@10": metrics["holdout_ndcg@10"],
            "final_loss": trained.final_loss,
            "steady_seconds_per_epoch": steady_epoch_seconds(trained.history),
            **device_details,
        },
    )


def implicit_reference(context: SideContext) -> Timed:
    threads = _limit_reference_threads(context)
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    # implicit's own advice (it warns otherwise): one BLAS thread, its loop
    # parallel over rows. BLAS with 2 threads under its 2 made its fit 10-15 %
    # slower here; each side runs in its own process, so this stays here.
    threadpool_limits(1, user_api="blas")

    ingest = _ingest(context)
    rank = int(context.variant["rank"])
    iterations = iterations_for(context.scale, IMPLICIT_ITERATIONS)
    liked = liked_matrix(ingest)
    # implicit's confidence is alpha · value; ours is 1 + α·r. Passing 1 + α·r as the
    # values with alpha 1 gives both the same objective.
    liked.data = (1.0 + IMPLICIT_ALPHA * liked.data).astype(np.float32)
    model = AlternatingLeastSquares(
        factors=rank,
        regularization=IMPLICIT_REGULARIZATION,
        alpha=1.0,
        iterations=iterations,
        use_cg=True,
        num_threads=threads,
        random_state=0,
        calculate_training_loss=False,
    )
    with stopwatch() as elapsed:
        model.fit(liked, show_progress=False)
    recall = ranking_recall(
        ingest,
        np.asarray(model.user_factors),
        np.asarray(model.item_factors),
        Path(context.work_dir) / "bench-reference",
    )
    return Timed(
        implementation=f"implicit {_version('implicit')} CPU ALS (CG), {threads} threads",
        seconds=elapsed[0],
        threads=threads,
        iterations=iterations,
        quality_name="recall@10",
        quality=recall,
    )


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def _missing_for_s3(*modules: str) -> str | None:
    absent = [name for name in modules if importlib.util.find_spec(name) is None]
    if absent:
        return f"not installed ({', '.join(absent)}): pip install 'mf-dist[bench,s3]'"
    return None


def _missing(*modules: str) -> str | None:
    absent = [name for name in modules if importlib.util.find_spec(name) is None]
    if absent:
        return f"reference not installed ({', '.join(absent)}): pip install 'mf-dist[bench]'"
    return None


# --- explicit-als ---------------------------------------------------------------------------


EXPLICIT_REGULARIZATION = 0.12


def explicit_ours(context: SideContext) -> Timed:
    method = str(context.variant.get("als_method", model_spec("explicit").defaults.als_method))
    settings = _settings(
        context,
        "explicit",
        "als",
        rank=64,
        epochs=iterations_for(context.scale, 5),
        regularization=EXPLICIT_REGULARIZATION,
        als_method=method,
    )
    trained, seconds, metrics, device_details = train_ours(
        context, settings, with_cooccurrence=False, evaluate=True
    )
    steps = f" ({settings.cg_steps} steps)" if method == "cg" else ""
    return Timed(
        implementation=f"explicit/als, {method} row solves{steps}, k=64, {layout_words(context)}",
        seconds=seconds,
        threads=reference_threads(context),
        iterations=trained.epochs,
        quality_name="held-out RMSE",
        quality=metrics["holdout_rmse"],
        details=device_details,
    )


def explicit_reference(context: SideContext) -> Timed:
    import pandas as pd
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import SparkSession

    ingest = _ingest(context)
    iterations = iterations_for(context.scale, 5)
    threads = reference_threads(context)

    def frame(held_out: bool) -> pd.DataFrame:
        paths = [
            ingest.holdout_path(b) if held_out else ingest.ratings_path(b)
            for b in range(ingest.user_grid.n_blocks)
        ]
        tables = [read_table(p, columns=["user", "item", "rating"]) for p in paths if exists(p)]
        return pd.concat([t.to_pandas() for t in tables], ignore_index=True).astype(
            {"user": "int32", "item": "int32", "rating": "float32"}
        )

    spark = (
        SparkSession.builder.master(f"local[{threads}]")
        .appName("mf-dist-bench")
        .config("spark.driver.memory", "6g")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )
    try:
        train = spark.createDataFrame(frame(held_out=False)).cache()
        train.count()
        # Spark's regParam is ALS-WR's weighted λ (scaled by each row's rating count), like ours.
        als = ALS(
            rank=64,
            maxIter=iterations,
            regParam=EXPLICIT_REGULARIZATION,
            userCol="user",
            itemCol="item",
            ratingCol="rating",
            coldStartStrategy="drop",
            seed=0,
        )
        with stopwatch() as elapsed:
            model = als.fit(train)
            # fit is lazy about the factors until they are used; count forces them.
            model.userFactors.count()
        held = frame(held_out=True)
        predicted = model.transform(spark.createDataFrame(held)).select("rating", "prediction").toPandas()
    finally:
        spark.stop()
    error = predicted["prediction"].to_numpy(np.float64) - predicted["rating"].to_numpy(np.float64)
    return Timed(
        implementation=f"Spark MLlib ALS {_version('pyspark')}, local[{threads}]",
        seconds=elapsed[0],
        threads=threads,
        iterations=iterations,
        quality_name="held-out RMSE",
        quality=float(np.sqrt(np.mean(error**2))),
        details={"scored": len(error)},
    )


def explicit_unavailable() -> str | None:
    missing = _missing("pyspark")
    if missing:
        return missing
    try:
        probe = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return "Spark needs Java 17 and no `java` is on PATH"
    if probe.returncode != 0:
        return f"`java -version` failed: {probe.stderr.strip()[:200]}"
    return None


# --- nmf ------------------------------------------------------------------------------------


NMF_ITEMS = 10_000


def _top_items(scale: Scale, wanted: int) -> int:
    # Fewer items than that exist at the small scales; fit them all.
    return min(wanted, scale.n_items)


def prepare_nmf(cache_dir: Path, scale: Scale, workers: int, variant: Variant) -> tuple[Path, Path]:
    source = most_liked_items_dir(cache_dir, scale, _top_items(scale, NMF_ITEMS))
    return source, prepared_work_dir(cache_dir, scale, source, holdout=0.0, workers=workers)


def _nmf_settings(context: SideContext) -> TrainSettings:
    return _settings(context, "nmf", "mu", rank=64, epochs=iterations_for(context.scale, 20, tiny=5))


def shared_nmf_start(
    x: sp.csr_matrix, grid: BlockGrid, settings: TrainSettings
) -> tuple[np.ndarray, np.ndarray]:
    """The W and H our ``nmf`` trainer starts from (float32, items × k), for the reference to start from too.

    Both use scikit-learn's ``init="random"`` rule, scale · |N(0, 1)| with
    scale = sqrt(mean(X) / k), but draw different numbers; after 20
    multiplicative updates two draws ended 0.9–1.1 % apart in the loss. From
    the same start the two sides run the same iteration, so their losses
    compare the updates, not the luck of the draw.
    """
    mean = float(x.sum(dtype=np.float64)) / max(1, x.shape[0] * x.shape[1])
    scale = nmf_objective.initial_scale(mean, settings.rank)

    def side(index: int) -> np.ndarray:
        return np.concatenate(
            [
                nmf_objective.initial_factor(
                    stop - start, settings.rank, scale, block_seed(settings.seed, 0, index, block)
                ).numpy()
                for block, start, stop in grid
            ]
        )

    return side(0), side(1)


def nmf_ours(context: SideContext) -> Timed:
    settings = _nmf_settings(context)
    trained, seconds, _, device_details = train_ours(
        context, settings, with_cooccurrence=True, evaluate=False
    )
    ingest = _ingest(context)
    route = _x_products_route(context, settings)
    error = relative_frobenius_error(
        _cooccurrence_matrix(ingest),
        _read_table(trained.table("items")),
        _read_table(trained.table("contexts")),
    )
    return Timed(
        implementation=f"nmf/mu on X (products from the {route}), k=64, {layout_words(context)}",
        seconds=seconds,
        threads=reference_threads(context),
        iterations=trained.epochs,
        quality_name="‖X−WHᵀ‖/‖X‖",
        quality=error,
        details={"items": ingest.n_items, **device_details},
    )


def nmf_reference(context: SideContext) -> Timed:
    threads = _limit_reference_threads(context)
    from sklearn.decomposition import NMF

    ingest = _ingest(context)
    x = _cooccurrence_matrix(ingest)
    settings = _nmf_settings(context)
    start_w, start_h = shared_nmf_start(x, ingest.item_grid, settings)
    model = NMF(n_components=settings.rank, solver="mu", init="custom", max_iter=settings.epochs, tol=0.0)
    with stopwatch() as elapsed:
        w = model.fit_transform(x, W=start_w, H=np.ascontiguousarray(start_h.T))
    return Timed(
        implementation=(
            f"scikit-learn {_version('scikit-learn')} NMF(solver='mu'), sparse X, {threads} threads"
        ),
        seconds=elapsed[0],
        threads=threads,
        iterations=int(model.n_iter_),
        quality_name="‖X−WHᵀ‖/‖X‖",
        quality=relative_frobenius_error(x, w, model.components_.T),
    )


def nmf_ours_unavailable() -> str | None:
    if "nmf" not in MODELS or "mu" not in MODELS["nmf"].solvers:
        return "our nmf/mu trainer is not registered in mf_dist.registry in this version"
    return None


# --- cooccurrence-embedding -----------------------------------------------------------------


EMBEDDING_ITEMS = 9_724
EMBEDDING_RANK = 300
EMBEDDING_LEARNING_RATE = model_spec("cooccurrence").defaults.learning_rate

EMBEDDING_LARGE: Variant = {"items": 100_000, "rank": 128}
"""The issue's large case, M = 100,000 items at D = 128, on :data:`~mf_dist.bench.data.MANY_ITEMS`
(a few thousand items at tiny). Its X = SᵀS is held sparse; one dense M × M float32 matrix is 40 GB."""
EMBEDDING_LARGE_EPOCHS = 3
FLOAT32_BYTES = 4


def _is_large(variant: Variant) -> bool:
    return "items" in variant


def prepare_embedding(cache_dir: Path, scale: Scale, workers: int, variant: Variant) -> tuple[Path, Path]:
    if _is_large(variant):
        source, shape = many_items_dir(cache_dir, scale)
        # Its own block size: at M = 100,000 the scale's would make a thousand-odd tiles.
        blocked = replace(scale, block_size=shape.block_size)
        return source, prepared_work_dir(cache_dir, blocked, source, holdout=0.0, workers=workers)
    source = most_liked_items_dir(cache_dir, scale, _top_items(scale, EMBEDDING_ITEMS))
    return source, prepared_work_dir(cache_dir, scale, source, holdout=0.0, workers=workers)


def _embedding_rank(ingest: IngestResult, variant: Variant) -> int:
    # Tiny data has fewer items than D = 300; a rank above the item count is rejected.
    return min(int(variant.get("rank", EMBEDDING_RANK)), ingest.n_items // 2)


def _embedding_epochs(context: SideContext) -> int:
    if _is_large(context.variant):
        # Three epochs measure s/epoch and memory; the large case has no reference loss to reach.
        return iterations_for(context.scale, EMBEDDING_LARGE_EPOCHS)
    return iterations_for(context.scale, 20, tiny=5)


def embedding_ours(context: SideContext) -> Timed:
    ingest = _ingest(context)
    rank = _embedding_rank(ingest, context.variant)
    settings = _settings(
        context,
        "cooccurrence",
        "gradient",
        rank=rank,
        epochs=_embedding_epochs(context),
        learning_rate=EMBEDDING_LEARNING_RATE,
        optimizer="adam",
    )
    trained, seconds, _, device_details = train_ours(
        context, settings, with_cooccurrence=True, evaluate=False
    )
    # The untimed stage's own record of X: its size is what the dense loop could not hold.
    cooccurrence = load_cooccurrence_result(context.work_dir)
    route = _x_products_route(context, settings)
    return Timed(
        implementation=(
            f"cooccurrence/gradient (Adam, products from the {route}), M={ingest.n_items}, D={rank}, "
            f"{layout_words(context)}"
        ),
        seconds=seconds,
        threads=reference_threads(context),
        iterations=trained.epochs,
        quality_name="Σ_{i≠j} loss",
        quality=trained.final_loss,
        details={
            "items": ingest.n_items,
            "rank": rank,
            "likes": ingest.n_likes,
            "nnz_offdiagonal": cooccurrence.nnz_offdiagonal,
            "tiles": len(cooccurrence.tiles),
            # The loss of V = 0, Σ_{i≠j} X², to read the final loss against.
            "loss_at_zero": cooccurrence.offdiagonal_sum_of_squares,
            **device_details,
        },
    )


def embedding_reference_unavailable(variant: Variant) -> str | None:
    """Why the dense loop cannot run on the large variant: its M × M matrices, by arithmetic.

    Decided by the variant's M, not the scale: at tiny the variant is a
    few-thousand-item stand-in that proves the command works, and reports
    the same as at full size.
    """
    if not _is_large(variant):
        return None
    items = int(variant["items"])
    matrix_gb = items**2 * FLOAT32_BYTES / 1e9
    return (
        f"reference not run: the dense loop holds X and V Vᵀ as M × M float32 matrices, "
        f"2 × {matrix_gb:.0f} GB = {2 * matrix_gb:.0f} GB at M = {items:,} (autograd keeps more); "
        f"ours keeps X sparse"
    )


def embedding_reference(context: SideContext) -> Timed:
    """The dense autograd loop: (V Vᵀ − X) under a strict lower-triangle mask, Adam, full batch."""
    threads = _limit_reference_threads(context)
    ingest = _ingest(context)
    x_sparse = _cooccurrence_matrix(ingest)
    n_items, rank = ingest.n_items, _embedding_rank(ingest, context.variant)
    epochs = _embedding_epochs(context)
    target = torch.from_numpy(x_sparse.toarray())
    mask = torch.tril(torch.ones(n_items, n_items, dtype=torch.bool), diagonal=-1)
    offdiagonal = target.masked_fill(~mask, 0)
    # The same start scale and step size as ours: learning rate × the start's std.
    scale = initial_scale(2 * float((offdiagonal.double() ** 2).sum()), n_items, rank)
    generator = torch.Generator().manual_seed(0)
    vectors = (torch.randn(n_items, rank, generator=generator) * scale).requires_grad_()
    optimizer = torch.optim.Adam([vectors], lr=EMBEDDING_LEARNING_RATE * scale)
    with stopwatch() as elapsed:
        for _ in range(epochs):
            optimizer.zero_grad()
            loss = (((vectors @ vectors.T - target) * mask) ** 2).sum()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        residual = ((vectors @ vectors.T - target) * mask).double()
        final = 2 * float((residual**2).sum())
    return Timed(
        implementation=f"dense torch autograd loop (tril mask, Adam), {threads} threads",
        seconds=elapsed[0],
        threads=threads,
        iterations=epochs,
        quality_name="Σ_{i≠j} loss",
        quality=final,
    )


# --- end-to-end -----------------------------------------------------------------------------


def end_to_end_ours(context: SideContext) -> Timed:
    """``mf-dist run`` on local disk: input, work directory and output in the bench's directories."""
    output = Path(context.work_dir).parent / "end-to-end-output"
    shutil.rmtree(output, ignore_errors=True)
    return _end_to_end_run(context, context.input_dir, str(output), {}, "on local disk")


def end_to_end_on_s3(context: SideContext) -> Timed:
    """The same run with input, work directory and output on an S3 server on loopback (moto).

    The input is uploaded before the clock starts; the workers of the run's
    local cluster find the server through ``AWS_ENDPOINT_URL``. The server is
    one Python process on this machine, sharing its cores with the run: the
    time is an upper bound on a real store's.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        environment = {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        import fsspec

        store = fsspec.filesystem(
            "s3",
            skip_instance_cache=True,
            client_kwargs={"endpoint_url": environment["AWS_ENDPOINT_URL"]},
            key="bench",
            secret="bench",
        )
        store.mkdir(BENCH_BUCKET)
        for file in sorted(Path(context.input_dir).glob("*.parquet")):
            store.put_file(str(file), f"{BENCH_BUCKET}/ratings/{file.name}")
        return _end_to_end_run(
            context,
            f"s3://{BENCH_BUCKET}/ratings/",
            f"s3://{BENCH_BUCKET}/out",
            environment,
            "on S3 (moto, loopback)",
        )
    finally:
        server.stop()


BENCH_BUCKET = "mf-dist-bench"


def _end_to_end_run(
    context: SideContext, input_location: str, output: str, environment: dict[str, str], where: str
) -> Timed:
    """Time ``mf-dist run`` (cooccurrence, k = 64, 10 epochs) from ``input_location`` to ``output``."""
    command = [
        sys.executable,
        "-m",
        "mf_dist.cli",
        "run",
        "--input",
        input_location,
        "--output",
        output,
        "--model",
        "cooccurrence",
        "--rank",
        "64",
        "--epochs",
        "10",
        "--workers",
        str(context.workers),
        "--like-threshold",
        str(LIKE_THRESHOLD),
        "--device",
        context.device,
        "--quiet",
    ]
    env = {**os.environ, "NO_COLOR": "1", **environment}
    with stopwatch() as elapsed:
        completed = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"mf-dist run failed:\n{completed.stderr[-2000:]}")
    from mf_dist.storage.reader import read_embeddings

    previous = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        manifest = read_embeddings(output, "items").manifest
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return Timed(
        implementation=f"mf-dist run (Prefect flow), cooccurrence, k=64, 10 epochs, {where}",
        seconds=elapsed[0],
        threads=context.workers,
        quality_name="final loss",
        quality=float(manifest["metrics"]["final_loss"]),
    )


SUITES: dict[str, Suite] = {
    suite.name: suite
    for suite in [
        Suite(
            "cooccurrence",
            "≤ 0.6× scipy's time; no process above 4 GB",
            [{}],
            prepare_full,
            cooccurrence_ours,
            cooccurrence_reference,
        ),
        Suite(
            "implicit-als",
            "≤ 1.0× per iteration at equal recall@10",
            # Worker processes (the default), then one process with a thread per core.
            [{"rank": 64}, {"rank": 128}, *({"rank": k, "layout": "threads"} for k in (64, 128))],
            prepare_holdout,
            implicit_ours,
            implicit_reference,
            lambda: _missing("implicit"),
        ),
        Suite(
            "explicit-als",
            "≤ 0.2× Spark per iteration, RMSE no worse",
            # Spark runs once per variant: the same fit, timed again beside each of ours.
            [{"als_method": "cholesky"}, {"als_method": "cg"}],
            prepare_holdout,
            explicit_ours,
            explicit_reference,
            explicit_unavailable,
        ),
        Suite(
            "nmf",
            "≤ 0.5× per iteration; loss finite and within 1%",
            [{}],
            prepare_nmf,
            nmf_ours,
            nmf_reference,
            lambda: _missing("sklearn"),
            nmf_ours_unavailable,
        ),
        Suite(
            "cooccurrence-embedding",
            "≥ 5× faster per epoch at equal loss",
            [{}, EMBEDDING_LARGE],
            prepare_embedding,
            embedding_ours,
            embedding_reference,
            variant_reference_unavailable=embedding_reference_unavailable,
            variant_target=lambda variant: (
                "peak under 8 GB over the whole process tree (the dense loop cannot run)"
                if _is_large(variant)
                else None
            ),
        ),
        Suite(
            "recommend",
            "≤ 0.5× implicit's time, identical top-100 lists (up to ties), no process above 4 GB",
            # All users' top 100 (seen likes filtered); fold-in of 10,000 new users.
            recommend_suite.VARIANTS,
            recommend_suite.prepare_recommend,
            recommend_suite.ours,
            recommend_suite.reference,
            lambda: _missing("implicit"),
            variant_target=recommend_suite.variant_target,
        ),
        Suite(
            "end-to-end",
            "≤ 5 minutes wall, no process above 8 GB",
            [{}],
            lambda cache_dir, scale, workers, variant: (
                ratings_dir(cache_dir, scale),
                cache_dir / scale.name / "e2e",
            ),
            end_to_end_ours,
            None,
        ),
        # The same run with input, work and output on S3 beside it on local disk:
        # "ours" is the S3 run, the "reference" the local one, the ratio what the store costs.
        Suite(
            "end-to-end-s3",
            "the S3 run's wall time over the local-disk run's (an upper bound: Python S3 server on loopback)",
            [{}],
            lambda cache_dir, scale, workers, variant: (
                ratings_dir(cache_dir, scale),
                cache_dir / scale.name / "e2e-s3",
            ),
            end_to_end_on_s3,
            end_to_end_ours,
            ours_unavailable=lambda: _missing_for_s3("moto", "s3fs"),
        ),
    ]
}
