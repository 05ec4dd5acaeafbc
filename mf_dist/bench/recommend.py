"""The ``recommend`` suite: every user's top-N unseen items, and fold-in of new users.

Both variants run on one published run whose ``users`` and ``items`` tables
hold random factors (k = 64, N(0, k^-1/2) entries, so scores are O(1)),
written by the real export stage over the scale's ingest: the ranking and the
solve cost the same for any factors, and no 20 M-rating training run is
needed. The seen items are the ingest's likes (rating ≥ 4), as for a trained
``implicit`` run. Preparation (generate, ingest, export the factors) is never
timed.

* ``n=100``: ours is :func:`mf_dist.stages.recommend.recommend_items`, the
  stage ``--recommend`` runs, on a local Dask cluster, timed whole (the
  Parquet table written and published included). The reference is
  ``implicit``'s ``model.recommend(all users, liked CSR, N=100,
  filter_already_liked_items=True)`` with the same factors, on as many threads.
  The reference side (run second) also reads our published table and checks
  that the two top-N lists agree, up to swaps of scores equal within 1e-5.
* ``fold_in=10000``: ours is :func:`mf_dist.fold_in` (one machine, the
  model's exact ALS user half-step) on the liked ratings of 10,000 users
  against the published items; the reference is ``implicit``'s
  ``model.recalculate_user`` (its Cholesky solve) on the same users, values
  ``1 + α·r`` with alpha 1 (our confidence). The reference side also runs our
  fold-in (untimed) and reports the largest vector difference.

Quality figures, computed the same way on both sides: the mean score of the
recommended rows; the mean per-user ALS objective of the folded vectors.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import scipy.sparse as sp
import torch

from mf_dist.bench.data import prepared_work_dir, ratings_dir
from mf_dist.bench.measure import SideContext, Timed, stopwatch
from mf_dist.bench.scales import LIKE_THRESHOLD, Scale
from mf_dist.ranking import top_n
from mf_dist.runtime.cluster import compute_device, open_client
from mf_dist.stages.export import export_tables
from mf_dist.storage.factor_files import EpochRecord, FactorTable, TrainResult, write_factor_block
from mf_dist.storage.ingested import IngestResult, load_ingest_result
from mf_dist.storage.reader import Embeddings, read_embeddings

Variant = dict[str, int | float | str]

RANK = 64
TOP_N = 100
FOLD_IN_USERS = 10_000
# The implicit-als suite's hyperparameters: the fold-in solves that model's user half-step.
ALPHA = 10.0
REGULARIZATION = 0.1
FACTOR_SEED = 18
RUN_ID = "bench-random-factors"
RECOMMENDATIONS_RUN_ID = "bench-recommend"
SCORE_TOLERANCE = 1e-5
GEMM_REPEATS = 3


def output_dir(work_dir: str | Path) -> Path:
    """The published run of random factors that both sides read (beside the work directory)."""
    return Path(work_dir).parent / f"{Path(work_dir).name}-recommend-output"


def random_factors(rows: int, seed: int) -> np.ndarray:
    """(rows, RANK) float32, entries N(0, RANK^-1/2): a dot product of two rows has variance 1."""
    generator = np.random.default_rng(seed)
    return (generator.standard_normal((rows, RANK), dtype=np.float32) * RANK**-0.25).astype(np.float32)


def publish_random_factors(ingest: IngestResult, work_dir: Path, output: Path, workers: int) -> None:
    """Export ``users`` and ``items`` tables of random factors as run :data:`RUN_ID` of an ``implicit`` model.

    The real export stage writes them, so the manifests (ids, fingerprint,
    hyperparameters, like threshold) are a trained run's.
    """
    factors_dir = work_dir / "bench-random-factors"
    shutil.rmtree(factors_dir, ignore_errors=True)
    shutil.rmtree(output, ignore_errors=True)
    tables = []
    for index, (name, rows) in enumerate((("users", ingest.n_users), ("items", ingest.n_items))):
        table = FactorTable(
            name=name,
            directory=str(factors_dir / name),
            n_rows=rows,
            block_size=ingest.block_size,
            rank=RANK,
            has_bias=False,
        )
        vectors = random_factors(rows, FACTOR_SEED + index)
        for block, start, stop in table.grid:
            write_factor_block(table, block, vectors[start:stop], None)
        tables.append(table)
    trained = TrainResult(
        model="implicit",
        solver="als",
        rank=RANK,
        epochs=0,
        learning_rate=0.0,
        settings={"alpha": ALPHA, "regularization": REGULARIZATION},
        history=[EpochRecord(epoch=0, loss=0.0, seconds=0.0)],
        tables=tables,
        device="cpu",
    )
    config = {"like_threshold": LIKE_THRESHOLD, "holdout": 0.0, "work_dir": str(work_dir)}
    with open_client(workers=workers) as client:
        export_tables(client, trained, ingest, output, run_id=RUN_ID, config=config)


def prepare_recommend(cache_dir: Path, scale: Scale, workers: int, variant: Variant) -> tuple[Path, Path]:
    """Generate and ingest the scale's ratings (no holdout) and publish random factors over them."""
    source = ratings_dir(cache_dir, scale)
    work_dir = prepared_work_dir(cache_dir, scale, source, holdout=0.0, workers=workers)
    publish_random_factors(load_ingest_result(work_dir), work_dir, output_dir(work_dir), workers)
    return source, work_dir


def _threads(context: SideContext) -> int:
    from mf_dist.bench.suites import _limit_reference_threads

    return _limit_reference_threads(context)


def gemm_rate(rows: int, columns: int, device: str, repeats: int = GEMM_REPEATS) -> float:
    """The best GFLOP/s of one float32 ``(rows, RANK) @ (RANK, columns)`` product on ``device``.

    Measured in this process with its torch thread count: the machine's
    rate for the scoring product the stage is bound by.
    """
    target = compute_device(device)
    left = torch.randn(rows, RANK, device=target)
    right = torch.randn(RANK, columns, device=target)
    best = float("inf")
    for _ in range(repeats + 1):  # the first warms the allocator and kernels up
        if target.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        (left @ right).sum()
        if target.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2.0 * rows * columns * RANK / best / 1e9


# --- recommendations -------------------------------------------------------------------------


def _recommend_n(context: SideContext) -> int:
    return int(context.variant.get("n", TOP_N))


def scoring_flop(n_users: int, n_items: int) -> float:
    """Users × items × k multiply-adds of the scoring product, as FLOP."""
    return 2.0 * n_users * n_items * RANK


def recommend_ours(context: SideContext) -> Timed:
    """Our recommendations stage on a local cluster, timed whole (scoring, seen filter, top-N, Parquet)."""
    import importlib

    from mf_dist.bench.suites import layout_words, local_layout, reference_threads
    from mf_dist.stages.recommend import recommend_items

    ingest = load_ingest_result(context.work_dir)
    output = output_dir(context.work_dir)
    shutil.rmtree(output / "recommendations", ignore_errors=True)
    processes, threads = local_layout(context)
    with open_client(workers=processes, threads_per_worker=threads) as client:
        client.run(importlib.import_module, "mf_dist.stages.recommend")
        # The compiled merge loaded from numba's cache (or compiled) before the stopwatch starts.
        client.run(top_n.warm_up)
        with stopwatch() as elapsed:
            result = recommend_items(
                client,
                output,
                _recommend_n(context),
                work_dir=context.work_dir,
                block_size=ingest.block_size,
                run_id=RECOMMENDATIONS_RUN_ID,
                device=context.device,
            )
    scores = pq.read_table(result.path, columns=["score"])["score"].to_numpy()
    cores = reference_threads(context)
    torch.set_num_threads(cores)
    flop = scoring_flop(result.users, ingest.n_items)
    return Timed(
        implementation=(
            f"recommendations stage, k={RANK}, N={result.n}, seen {result.seen} filtered, "
            f"{layout_words(context)}"
        ),
        seconds=elapsed[0],
        threads=cores,
        quality_name=f"mean top-{result.n} score",
        quality=float(scores.mean(dtype=np.float64)),
        details={
            "users": result.users,
            "items": ingest.n_items,
            "rows": result.rows,
            "users_short": result.users_short,
            "users_per_second": result.users / elapsed[0],
            "gflops": flop / elapsed[0] / 1e9,
            # The same product, one block of users against all items, on this side's cores.
            f"gemm_gflops_{cores}_threads": gemm_rate(ingest.block_size, ingest.n_items, context.device),
            "device": result.device,
        },
    )


def _published_factors(context: SideContext) -> tuple[Embeddings, Embeddings]:
    output = output_dir(context.work_dir)
    return read_embeddings(output, "users"), read_embeddings(output, "items")


def recommend_reference(context: SideContext) -> Timed:
    """``implicit``'s batch ``recommend`` with the seen likes filtered, on the same factors."""
    threads = _threads(context)
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    from mf_dist.bench.suites import _version, liked_matrix

    # implicit's own advice: one BLAS thread, its loop parallel over users.
    threadpool_limits(1, user_api="blas")
    ingest = load_ingest_result(context.work_dir)
    users, items = _published_factors(context)
    liked = liked_matrix(ingest)
    n = _recommend_n(context)
    model = AlternatingLeastSquares(factors=RANK, num_threads=threads, random_state=0)
    model.user_factors = users.vectors
    model.item_factors = items.vectors
    every_user = np.arange(ingest.n_users)
    with stopwatch() as elapsed:
        ids, scores = model.recommend(every_user, liked, N=n, filter_already_liked_items=True)
    finite = np.isfinite(scores) & (ids >= 0)
    details: dict[str, float | int | str] = {
        "users": ingest.n_users,
        "users_per_second": ingest.n_users / elapsed[0],
        "gflops": scoring_flop(ingest.n_users, ingest.n_items) / elapsed[0] / 1e9,
    }
    details.update(compare_with_ours(context, ingest, users, items, ids, scores))
    return Timed(
        implementation=(
            f"implicit {_version('implicit')} model.recommend(N={n}, filter_already_liked_items=True), "
            f"{threads} threads"
        ),
        seconds=elapsed[0],
        threads=threads,
        quality_name=f"mean top-{n} score",
        quality=float(scores[finite].mean(dtype=np.float64)),
        details=details,
    )


def our_top_lists(path: Path, users: Embeddings, items: Embeddings, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Our published table as (users × n) item rows (−1: none) and scores (−inf: none), rank order."""
    table = pq.read_table(path).to_pandas()
    user_rows = pd.Index(users.ids).get_indexer(table["user_id"].to_numpy())
    item_rows = pd.Index(items.ids).get_indexer(table["item_id"].to_numpy())
    rows = np.full((len(users.ids), n), -1, np.int64)
    scores = np.full((len(users.ids), n), -np.inf, np.float32)
    ranks = table["rank"].to_numpy() - 1
    rows[user_rows, ranks] = item_rows
    scores[user_rows, ranks] = table["score"].to_numpy()
    return rows, scores


def agreement(
    ours_items: np.ndarray,
    ours_scores: np.ndarray,
    ref_items: np.ndarray,
    ref_scores: np.ndarray,
    tolerance: float = SCORE_TOLERANCE,
    chunk: int = 4096,
) -> dict[str, int | float]:
    """How two top-N lists per user agree: identical, equal up to ties, or different.

    Both are (users × n), best first. A user's lists are equal up to ties
    when the scores agree position by position within ``tolerance`` and every
    item of ours that is not in the reference list at a score within
    ``tolerance`` of its own is tied (within ``tolerance``) with the
    reference's last kept score: equal scores may be ordered or cut either way.
    """
    identical = up_to_ties = different = 0
    worst = 0.0
    for start in range(0, len(ours_items), chunk):
        oi, os_ = ours_items[start : start + chunk], ours_scores[start : start + chunk]
        ri, rs = ref_items[start : start + chunk], ref_scores[start : start + chunk]
        finite = np.isfinite(os_) & np.isfinite(rs)
        gap = np.where(finite, np.abs(os_.astype(np.float64) - rs), 0.0)
        worst = max(worst, float(gap.max(initial=0.0)))
        scores_agree = (gap <= tolerance).all(axis=1) & (np.isfinite(os_) == np.isfinite(rs)).all(axis=1)
        same = (oi == ri).all(axis=1) & scores_agree
        # Each of our items: its position in the reference list (same item at a score within tolerance).
        matches = (oi[:, :, None] == ri[:, None, :]) & (
            np.abs(os_[:, :, None].astype(np.float64) - rs[:, None, :]) <= tolerance
        )
        found = matches.any(axis=2) | ~np.isfinite(os_)
        last = np.where(np.isfinite(rs), rs, np.inf).min(axis=1)
        tied_at_cut = np.abs(os_ - last[:, None]) <= tolerance
        tied = scores_agree & (found | tied_at_cut).all(axis=1)
        identical += int(same.sum())
        up_to_ties += int((tied & ~same).sum())
        different += int((~tied).sum())
    return {
        "users_identical": identical,
        "users_equal_up_to_ties": up_to_ties,
        "users_different": different,
        "max_score_difference": worst,
    }


def compare_with_ours(
    context: SideContext,
    ingest: IngestResult,
    users: Embeddings,
    items: Embeddings,
    ref_items: np.ndarray,
    ref_scores: np.ndarray,
) -> dict[str, int | float | str]:
    """:func:`agreement` of the reference's lists with our published table (our side runs first)."""
    path = output_dir(context.work_dir) / "recommendations" / "runs" / RECOMMENDATIONS_RUN_ID
    if not path.is_dir():
        return {"agreement": "our table is missing (our side failed)"}
    ref_scores = np.where(ref_items >= 0, ref_scores, -np.inf).astype(np.float32)
    ours_items, ours_scores = our_top_lists(path, users, items, ref_items.shape[1])
    return agreement(ours_items, ours_scores, ref_items.astype(np.int64), ref_scores)


# --- fold-in ---------------------------------------------------------------------------------


def _fold_in_users(context: SideContext, ingest: IngestResult) -> int:
    return min(int(context.variant["fold_in"]), ingest.n_users)


def new_users_frame(ingest: IngestResult, items: Embeddings, count: int) -> pd.DataFrame:
    """The ratings of the ``count`` last users (by index) as new users (fresh ``user_id``s).

    Every rating is given, as a service would pass a user's history; the fold-in keeps the likes.
    """
    first = ingest.n_users - count
    frames = []
    for block, _, stop in ingest.user_grid:
        if stop <= first:
            continue
        table = pq.read_table(ingest.ratings_path(block)).to_pandas()
        frames.append(table[table["user"] >= first])
    ratings = pd.concat(frames, ignore_index=True)
    return pd.DataFrame(
        {
            "user_id": ratings["user"].to_numpy(np.int64) + 10**9,
            "item_id": np.asarray(items.ids)[ratings["item"].to_numpy()],
            "rating": ratings["rating"].to_numpy(np.float32),
        }
    )


def liked_confidence(frame: pd.DataFrame, items: Embeddings) -> tuple[np.ndarray, sp.csr_matrix]:
    """(user ids, CSR of confidences 1 + α·r on the liked entries), rows in ascending user id order."""
    liked = frame[frame["rating"] >= LIKE_THRESHOLD]
    codes, user_ids = pd.factorize(liked["user_id"], sort=True)
    columns = pd.Index(items.ids).get_indexer(liked["item_id"].to_numpy())
    values = 1.0 + ALPHA * liked["rating"].to_numpy(np.float64)
    matrix = sp.csr_matrix(
        (values.astype(np.float32), (codes, columns)), shape=(len(user_ids), len(items.ids))
    )
    return np.asarray(user_ids), matrix


def fold_in_objective(vectors: np.ndarray, confidence: sp.csr_matrix, items: np.ndarray) -> float:
    """The mean over users of the implicit ALS user objective at ``vectors`` (float64).

    Σ_i c_ui (p_ui − x_u·y_i)² + λ‖x_u‖², with c = 1 and p = 0 off the liked
    entries: xᵀ(YᵀY)x over all items, corrected on the liked ones.
    """
    x, y = vectors.astype(np.float64), items.astype(np.float64)
    everything = np.einsum("uk,kl,ul->u", x, y.T @ y, x)
    coo = confidence.tocoo()
    score = np.einsum("ek,ek->e", x[coo.row], y[coo.col])
    liked = np.bincount(coo.row, coo.data * (1.0 - score) ** 2 - score**2, minlength=len(x))
    return float(np.mean(everything + liked + REGULARIZATION * (x**2).sum(axis=1)))


def fold_in_ours(context: SideContext) -> Timed:
    """:func:`mf_dist.fold_in` of the new users' ratings against the published items, on this side's cores."""
    from mf_dist.bench.suites import reference_threads
    from mf_dist.stages.fold_in import fold_in

    cores = reference_threads(context)
    torch.set_num_threads(cores)
    ingest = load_ingest_result(context.work_dir)
    _, items = _published_factors(context)
    count = _fold_in_users(context, ingest)
    frame = new_users_frame(ingest, items, count)
    # One user first, untimed: loads the compiled float64 row loop from numba's cache (or
    # compiles it), as implicit's loop was compiled when it was installed.
    fold_in(items, frame[frame["user_id"] == frame["user_id"].iloc[0]])
    with stopwatch() as elapsed:
        folded = fold_in(items, frame)
    user_ids, confidence = liked_confidence(frame, items)
    if not np.array_equal(user_ids, folded.ids):
        raise RuntimeError("fold-in returned other users than those with likes")
    return Timed(
        implementation=f"mf_dist.fold_in (exact ALS user half-step), k={RANK}, {cores} threads",
        seconds=elapsed[0],
        threads=cores,
        quality_name="mean user objective",
        quality=fold_in_objective(folded.vectors, confidence, items.vectors),
        details={"users": len(folded.ids), "users_per_second": len(folded.ids) / elapsed[0]},
    )


def fold_in_reference(context: SideContext) -> Timed:
    """``implicit``'s ``recalculate_user`` (Cholesky) of the same users, and its distance to ours."""
    threads = _threads(context)
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    from mf_dist.bench.suites import _version
    from mf_dist.stages.fold_in import fold_in

    threadpool_limits(1, user_api="blas")
    ingest = load_ingest_result(context.work_dir)
    _, items = _published_factors(context)
    frame = new_users_frame(ingest, items, _fold_in_users(context, ingest))
    user_ids, confidence = liked_confidence(frame, items)
    # Values 1 + α·r with alpha 1: implicit's confidence equals ours, 1 + α·r.
    model = AlternatingLeastSquares(
        factors=RANK, regularization=REGULARIZATION, alpha=1.0, use_cg=False, num_threads=threads
    )
    model.item_factors = items.vectors
    with stopwatch() as elapsed:
        vectors = model.recalculate_user(np.arange(len(user_ids)), confidence)
    ours = fold_in(items, frame).vectors
    return Timed(
        implementation=(
            f"implicit {_version('implicit')} model.recalculate_user (Cholesky), {threads} threads"
        ),
        seconds=elapsed[0],
        threads=threads,
        quality_name="mean user objective",
        quality=fold_in_objective(np.asarray(vectors), confidence, items.vectors),
        details={
            "users": len(user_ids),
            "users_per_second": len(user_ids) / elapsed[0],
            "max_abs_difference_to_ours": float(np.abs(ours - vectors).max()),
        },
    )


# --- the variants ----------------------------------------------------------------------------


def _is_fold_in(context: SideContext) -> bool:
    return "fold_in" in context.variant


def ours(context: SideContext) -> Timed:
    return fold_in_ours(context) if _is_fold_in(context) else recommend_ours(context)


def reference(context: SideContext) -> Timed:
    return fold_in_reference(context) if _is_fold_in(context) else recommend_reference(context)


VARIANTS: list[Variant] = [{"n": TOP_N}, {"fold_in": FOLD_IN_USERS}]


def variant_target(variant: Variant) -> str | None:
    if "fold_in" in variant:
        return "users/s beside implicit's recalculate_user; vectors equal to 1e-5"
    return None
