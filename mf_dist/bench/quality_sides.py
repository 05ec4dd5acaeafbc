"""The sides of ``mf-dist bench quality``: ours through the real stages, the references, the baselines.

Every side fits one fold's training ratings and hands back plain arrays: the
predicted ratings of the fold's held-out pairs (``explicit``), or a
(users × items) score matrix (``implicit`` and ``item-knn``). The caller
scores them all with :mod:`mf_dist.stages.scoring`, so no side has a metric
of its own.

Ours runs with the run configuration's defaults as they are (the registry's
per-model defaults): ``ingest_ratings``, ``cooccurrence_blocks`` when the
model fits X, ``train_factors`` and ``export_tables`` on a local Dask
cluster, and the published tables read back with ``read_embeddings``, as any
consumer reads them. Its time is ingest + co-occurrence + training; the
references' time is their ``fit`` on data already in memory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from mf_dist.bench.measure import stopwatch
from mf_dist.bench.quality_data import COLUMNS, LIKE_THRESHOLD, Fold

Task = Literal["explicit", "implicit", "item-knn"]
"""What a side is scored on: held-out RMSE, or recall@10/NDCG@10 of held-out likes from user vectors
(``implicit``) or from item vectors used item to item (``item-knn``)."""

Config = dict[str, Any]


@dataclass
class Fitted:
    """What one side's fit of one fold hands to the scoring: exactly one of the two arrays."""

    seconds: float
    predicted: np.ndarray | None = None
    """(len(fold.test),) float64 predicted ratings of the fold's held-out pairs, in their order."""
    scores: np.ndarray | None = None
    """(n_users × n_items) float64, higher is better."""
    config: str = ""
    """The configuration as run, in words (ours: the defaults the run config resolved)."""


@dataclass
class Resources:
    """What sides share over a bench run: our Dask client, a Spark session, a scratch directory."""

    workers: int
    scratch: Path
    client: Any = None
    spark: Any = None
    _closers: list[Callable[[], None]] = field(default_factory=list)


@dataclass(frozen=True)
class Side:
    """One row family of the table: a model or library, how it is fitted, its grid."""

    name: str
    task: Task
    kind: Literal["ours", "reference", "baseline"]
    fit: Callable[[Fold, Config, Resources], Fitted]
    default: Config = field(default_factory=dict)
    grid: tuple[Config, ...] = ()
    """Configurations tried on an inner split of fold 0's training part; the best one is a second row."""
    unavailable: Callable[[], str | None] = lambda: None


def _missing(module: str, package: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"unavailable: pip install {package} (or 'mf-dist[bench]')"
    return None


def _words(config: Config) -> str:
    return ", ".join(
        f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}" for key, value in config.items()
    )


# --- ours ---------------------------------------------------------------------------------------


def _positions(ids: np.ndarray, table_ids: np.ndarray) -> np.ndarray:
    """Fold positions of a table's ids (every id of a table trained on the fold is in the fold)."""
    positions = pd.Index(ids).get_indexer(table_ids)
    assert (positions >= 0).all(), "a published id is not in the ratings file"
    return positions


def _full(rows: np.ndarray, n: int, values: np.ndarray) -> np.ndarray:
    """(n, ...) float64 zeros with ``values`` at ``rows``: rows a table lacks score 0."""
    full = np.zeros((n, *values.shape[1:]), np.float64)
    full[rows] = values
    return full


def item_knn_scores(likes: sp.spmatrix, item_vectors: np.ndarray) -> np.ndarray:
    """(users × items) Σ over a user's liked items i of cosine(v_i, v_j): item vectors as item-to-item.

    ``likes`` is the (users × items) 0/1 matrix of training likes, ``item_vectors``
    (items × rank); a zero vector has cosine 0 with everything.
    """
    norms = np.linalg.norm(item_vectors, axis=1, keepdims=True)
    unit = np.divide(item_vectors, norms, out=np.zeros_like(item_vectors), where=norms > 0)
    return np.asarray(sp.csr_matrix(likes) @ unit) @ unit.T


def ours_side(model: str, solver: str, task: Task) -> Side:
    """Our ``model`` with ``solver`` at the defaults of the run configuration."""

    def fit(fold: Fold, config: Config, resources: Resources) -> Fitted:
        return _fit_ours(model, solver, task, fold, resources)

    return Side(name=f"{model}/{solver}", task=task, kind="ours", fit=fit)


def _fit_ours(model: str, solver: str, task: Task, fold: Fold, resources: Resources) -> Fitted:
    from mf_dist.config import load_config
    from mf_dist.registry import model_spec
    from mf_dist.stages.cooccur import cooccurrence_blocks
    from mf_dist.stages.export import export_tables
    from mf_dist.stages.ingest import ingest_ratings
    from mf_dist.stages.train import train_factors
    from mf_dist.storage.reader import read_embeddings

    spec = model_spec(model)
    directory = resources.scratch / f"{model}-{solver}-fold{fold.index}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    source = directory / "train.parquet"
    fold.train[list(COLUMNS)].to_parquet(source)
    config = load_config(
        None,
        input=str(source),
        output=str(directory / "out"),
        work_dir=str(directory / "work"),
        model=model,
        solver=solver,
        # The rating models fit every rating; the others fit the likes, as a user would run them.
        like_threshold=None if spec.needs_ratings else LIKE_THRESHOLD,
        workers=resources.workers,
    )
    client = resources.client
    with stopwatch() as elapsed:
        ingest = ingest_ratings(
            client,
            config.input,
            config.resolved_work_dir,
            like_threshold=config.like_threshold,
            block_size=config.block_size,
        )
        if config.needs_cooccurrence:
            cooccurrence_blocks(client, ingest, config.resolved_work_dir)
        trained = train_factors(client, config.resolved_work_dir, config.train_settings)
    export_tables(
        client,
        trained,
        ingest,
        config.output,
        run_id=f"fold{fold.index}",
        config=config.model_dump(mode="json"),
    )
    settings = config.train_settings
    # The settings as configured (a run may stop earlier on its tolerance): what a re-run compares.
    words = f"rank {settings.rank}, λ {settings.regularization:g}, {settings.epochs} epochs"
    if model == "implicit":
        words += f", α {settings.alpha:g}, {settings.confidence} confidence"
        if settings.confidence == "log":
            words += f" (ε {settings.confidence_epsilon:g})"
    if solver == "gradient":
        # NMF's projected steps use no optimiser: its learning rate scales the 1/L step.
        optimizer = "" if model == "nmf" else f"{settings.optimizer} "
        words += f", {optimizer}lr {settings.learning_rate:g}"
    items = read_embeddings(config.output, "items")
    item_rows = _positions(fold.item_ids, items.ids)
    fitted = Fitted(seconds=elapsed[0], config=words)
    if task == "item-knn":
        fitted.scores = item_knn_scores(fold.train_likes, _full(item_rows, fold.n_items, items.vectors))
    else:
        users = read_embeddings(config.output, "users")
        user_rows = _positions(fold.user_ids, users.ids)
        user_vectors = _full(user_rows, fold.n_users, users.vectors)
        item_vectors = _full(item_rows, fold.n_items, items.vectors)
        if task == "implicit":
            fitted.scores = user_vectors @ item_vectors.T
        else:
            assert users.bias is not None and items.bias is not None
            u, i = fold.test["user"].to_numpy(), fold.test["item"].to_numpy()
            fitted.predicted = (
                items.manifest["global_mean"]
                + _full(user_rows, fold.n_users, users.bias)[u]
                + _full(item_rows, fold.n_items, items.bias)[i]
                + np.einsum("nk,nk->n", user_vectors[u], item_vectors[i])
            )
    shutil.rmtree(directory, ignore_errors=True)
    return fitted


# --- explicit references: Surprise SVD and SVD++, Spark ALS ----------------------------------------


def _surprise_side(name: str, algorithm: str, grid: tuple[Config, ...]) -> Side:
    def fit(fold: Fold, config: Config, resources: Resources) -> Fitted:
        import surprise

        reader = surprise.Reader(rating_scale=(fold.train["rating"].min(), fold.train["rating"].max()))
        data = surprise.Dataset.load_from_df(fold.train[["user", "item", "rating"]], reader)
        trainset = data.build_full_trainset()
        model = getattr(surprise, algorithm)(random_state=0, **config)
        with stopwatch() as elapsed:
            model.fit(trainset)
        predicted = np.array(
            [
                model.predict(u, i).est
                for u, i in zip(fold.test["user"].to_numpy(), fold.test["item"].to_numpy(), strict=True)
            ]
        )
        return Fitted(seconds=elapsed[0], predicted=predicted, config=_words(config) or "library defaults")

    return Side(
        name=name,
        task="explicit",
        kind="reference",
        fit=fit,
        grid=grid,
        unavailable=lambda: _missing("surprise", "scikit-surprise"),
    )


def _spark_unavailable() -> str | None:
    missing = _missing("pyspark", "pyspark")
    if missing:
        return missing
    if shutil.which("java") is None:
        return "unavailable: Spark needs Java 17 and no `java` is on PATH"
    return None


@contextmanager
def spark_session(threads: int) -> Iterator[Any]:
    """A local Spark session of ``threads`` cores (one per bench run: the JVM takes seconds to start)."""
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master(f"local[{threads}]")
        .appName("mf-dist-bench-quality")
        # Spark's progress bars would draw over the bench's table.
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", "2g")
        .config("spark.sql.shuffle.partitions", str(max(2, threads)))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.ui.enabled", "false")
        # ALS's lineage grows with every iteration; deserialising it recursively overflows the
        # default thread stack around 20 iterations unless it is checkpointed (below) or the stack is larger.
        .config("spark.driver.extraJavaOptions", "-Xss16m")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    checkpoints = tempfile.mkdtemp(prefix="mf-dist-spark-")
    # ALS checkpoints its factors every checkpointInterval (10) iterations once a directory is set.
    spark.sparkContext.setCheckpointDir(checkpoints)
    try:
        yield spark
    finally:
        # A JVM that died under a failed fit has nothing left to stop; the figures must survive it.
        with contextlib.suppress(Exception):
            spark.stop()
        shutil.rmtree(checkpoints, ignore_errors=True)


def _fit_spark(fold: Fold, config: Config, resources: Resources) -> Fitted:
    from pyspark.ml.recommendation import ALS

    if resources.spark is None:
        session = spark_session(resources.workers)
        resources.spark = session.__enter__()
        resources._closers.append(lambda: session.__exit__(None, None, None))
    spark = resources.spark
    columns = {"user": "int32", "item": "int32", "rating": "float32"}
    with warnings.catch_warnings():
        # PySpark warns that it does not yet support pandas 3; the conversion here is plain numbers.
        warnings.simplefilter("ignore", category=FutureWarning)
        train = spark.createDataFrame(fold.train[list(columns)].astype(columns)).cache()
    train.count()
    # regParam is ALS-WR's weighted λ (scaled by each row's rating count), like ours.
    # As many blocks as cores (Spark's default is 10): the same factors, less scheduling on a small set.
    blocks = {"numUserBlocks": resources.workers, "numItemBlocks": resources.workers}
    als = ALS(userCol="user", itemCol="item", ratingCol="rating", seed=0, **blocks, **config)
    with stopwatch() as elapsed:
        model = als.fit(train)
        # The factors are computed lazily; counting them forces the fit.
        model.userFactors.count()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        users = model.userFactors.toPandas()
        items = model.itemFactors.toPandas()
    train.unpersist()
    user_vectors = _full(users["id"].to_numpy(), fold.n_users, np.stack(users["features"].to_numpy()))
    item_vectors = _full(items["id"].to_numpy(), fold.n_items, np.stack(items["features"].to_numpy()))
    u, i = fold.test["user"].to_numpy(), fold.test["item"].to_numpy()
    predicted = np.einsum("nk,nk->n", user_vectors[u], item_vectors[i])
    return Fitted(seconds=elapsed[0], predicted=predicted, config=_words(config) or "library defaults")


# --- implicit references: implicit's ALS, popularity --------------------------------------------------


def _fit_implicit_als(fold: Fold, config: Config, resources: Resources) -> Fitted:
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    values = {"factors": 32, "iterations": 15, **config}
    likes = fold.train_likes.astype(np.float32)
    # implicit runs its own threads; BLAS threads on top of them only oversubscribe the cores
    # (and implicit warns about them when the model is built).
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(random_state=0, num_threads=resources.workers, **values)
        with stopwatch() as elapsed:
            model.fit(likes, show_progress=False)
    scores = np.asarray(model.user_factors, np.float64) @ np.asarray(model.item_factors, np.float64).T
    return Fitted(seconds=elapsed[0], scores=scores, config=_words(values) + ", binary likes")


def _fit_popularity(fold: Fold, config: Config, resources: Resources) -> Fitted:
    with stopwatch() as elapsed:
        counts = np.asarray(fold.train_likes.sum(axis=0), np.float64).ravel()
    return Fitted(
        seconds=elapsed[0], scores=np.tile(counts, (fold.n_users, 1)), config="items by training likes"
    )


# --- item-kNN references: implicit's cosine and BM25 ---------------------------------------------------


def _knn_side(name: str, recommender: str, grid: tuple[Config, ...]) -> Side:
    def fit(fold: Fold, config: Config, resources: Resources) -> Fitted:
        from implicit import nearest_neighbours

        model = getattr(nearest_neighbours, recommender)(num_threads=resources.workers, **config)
        likes = fold.train_likes.astype(np.float32)
        with warnings.catch_warnings(), stopwatch() as elapsed:
            # BM25 weighting hands implicit's own fit a COO matrix, and implicit warns about it.
            warnings.simplefilter("ignore", category=Warning)
            model.fit(likes, show_progress=False)
        # implicit's own recommend scores a user as its liked items' rows of the similarity matrix, summed.
        scores = np.asarray((likes @ model.similarity).todense(), np.float64)
        return Fitted(seconds=elapsed[0], scores=scores, config=_words(config) or "library defaults (K 20)")

    return Side(
        name=name,
        task="item-knn",
        kind="reference",
        fit=fit,
        grid=grid,
        unavailable=lambda: _missing("implicit", "implicit"),
    )


# --- the sides, in table order ---------------------------------------------------------------------

SURPRISE_SVD_GRID: tuple[Config, ...] = (
    {"n_factors": 100, "n_epochs": 30, "lr_all": 0.005, "reg_all": 0.05},
    {"n_factors": 100, "n_epochs": 40, "lr_all": 0.01, "reg_all": 0.1},
    {"n_factors": 50, "n_epochs": 30, "lr_all": 0.007, "reg_all": 0.08},
    {"n_factors": 200, "n_epochs": 40, "lr_all": 0.005, "reg_all": 0.1},
)
SURPRISE_SVDPP_GRID: tuple[Config, ...] = ({"n_epochs": 30, "lr_all": 0.007, "reg_all": 0.05},)
"""One point: an SVD++ fit takes ~10 s on ML-100K, five times SVD's."""
SPARK_ALS_GRID: tuple[Config, ...] = (
    {"rank": 32, "maxIter": 20, "regParam": 0.15},
    {"rank": 64, "maxIter": 20, "regParam": 0.2},
    {"rank": 64, "maxIter": 20, "regParam": 0.3},
)
"""Spark's defaults are rank 10, maxIter 10, regParam 0.1 (weighted λ, as ours)."""
IMPLICIT_ALS_GRID: tuple[Config, ...] = tuple(
    {"alpha": alpha, "regularization": regularization}
    for alpha in (1.0, 5.0, 20.0)
    for regularization in (0.01, 0.1, 1.0)
)
KNN_GRID: tuple[Config, ...] = ({"K": 20}, {"K": 50}, {"K": 200})


def _models_and_solvers() -> list[tuple[str, str]]:
    from mf_dist.registry import MODELS

    return [(name, solver) for name, spec in MODELS.items() for solver in spec.solvers]


def all_sides() -> list[Side]:
    """Every side, grouped by task: explicit, implicit, item-kNN; ours first in each group."""
    ours = _models_and_solvers()
    sides: list[Side] = [ours_side(m, s, "explicit") for m, s in ours if m == "explicit"]
    sides += [
        _surprise_side("surprise-svd", "SVD", SURPRISE_SVD_GRID),
        _surprise_side("surprise-svdpp", "SVDpp", SURPRISE_SVDPP_GRID),
        Side(
            name="spark-als",
            task="explicit",
            kind="reference",
            fit=_fit_spark,
            grid=SPARK_ALS_GRID,
            unavailable=_spark_unavailable,
        ),
    ]
    sides += [ours_side(m, s, "implicit") for m, s in ours if m == "implicit"]
    sides += [
        Side(
            name="implicit-als",
            task="implicit",
            kind="reference",
            fit=_fit_implicit_als,
            default={"alpha": 1.0, "regularization": 0.01},
            grid=IMPLICIT_ALS_GRID,
            unavailable=lambda: _missing("implicit", "implicit"),
        ),
        Side(name="popularity", task="implicit", kind="baseline", fit=_fit_popularity),
    ]
    sides += [ours_side(m, s, "item-knn") for m, s in ours if m in ("cooccurrence", "nmf")]
    sides += [
        _knn_side("knn-cosine", "CosineRecommender", KNN_GRID),
        _knn_side("knn-bm25", "BM25Recommender", KNN_GRID),
    ]
    return sides
