"""Products with X = SᵀS from the likes: against dense X on tiny data, the route choice, and both
routes of the co-occurrence trainers agreeing on a real cluster."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mf_dist.stages.cooccur import cooccurrence_blocks
from mf_dist.stages.ingest import ingest_ratings
from mf_dist.stages.train import train_factors
from mf_dist.storage.tiles import CooccurrenceResult, TileInfo
from mf_dist.trainers import liked_products
from mf_dist.trainers.liked_products import (
    LikedGramProducts,
    ResidentLikes,
    choose_x_products,
    liked_times,
)
from mf_dist.trainers.ratings_sides import SideEntries
from tests.support.devices import DEVICES
from tests.support.training import factors, settings


def random_likes(seed: int, n_users: int = 9, n_items: int = 7) -> sp.csr_matrix:
    generator = np.random.default_rng(seed)
    return sp.csr_matrix((generator.random((n_users, n_items)) < 0.4).astype(np.float32))


def entries_of(matrix: sp.csr_matrix) -> SideEntries:
    coo = matrix.tocoo()
    order = np.lexsort((coo.col, coo.row))
    return SideEntries(
        rows=torch.from_numpy(coo.row[order].astype(np.int64)),
        cols=torch.from_numpy(coo.col[order].astype(np.int64)),
        values=torch.ones(matrix.nnz),
        n_rows=matrix.shape[0],
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(3))
def test_two_liked_products_equal_the_dense_cooccurrence_product(seed, device):
    """Sᵀ(S V) from row blocks of S and Sᵀ equals X V, and minus d ⊙ V equals X₀ V, on every device."""
    s = random_likes(seed)
    x = (s.T @ s).toarray().astype(np.float64)
    vectors = torch.randn(s.shape[1], 3, generator=torch.Generator().manual_seed(seed))
    transposed = s.T.tocsr()
    user_blocks = [ResidentLikes(entries_of(s[a:b]), s.shape[1], device) for a, b in ((0, 4), (4, 9))]
    item_blocks = [
        ResidentLikes(entries_of(transposed[a:b]), s.shape[0], device) for a, b in ((0, 3), (3, 7))
    ]
    v_blocks = [vectors[:3], vectors[3:]]
    user_side = [liked_times(block, *v_blocks) for block in user_blocks]
    product = torch.cat([liked_times(block, *user_side) for block in item_blocks])
    np.testing.assert_allclose(product.double().numpy(), x @ vectors.double().numpy(), rtol=1e-5, atol=1e-5)

    counts = torch.cat([liked_products.like_counts(block) for block in item_blocks])
    np.testing.assert_array_equal(counts.numpy(), np.diag(x))
    offdiagonal = liked_products.without_diagonal(product, counts, vectors)
    x0 = x - np.diag(np.diag(x))
    np.testing.assert_allclose(offdiagonal.double().numpy(), x0 @ vectors.double().numpy(), atol=1e-5)
    total = sum(liked_products.squared_row_sums(block) for block in user_blocks)
    assert total == x.sum()


def test_resident_likes_travel_as_entries():
    """A block that moves between workers is rebuilt from its entries (CSR tensors do not pickle)."""
    s = random_likes(0)
    block = ResidentLikes(entries_of(s), s.shape[1], "cpu")
    copy = pickle.loads(pickle.dumps(block))
    np.testing.assert_array_equal(copy.matrix.to_dense().numpy(), s.toarray())


def result_with(tiles: list[TileInfo], n_items: int = 200, block_size: int = 100) -> CooccurrenceResult:
    return CooccurrenceResult(
        directory="unused",
        n_items=n_items,
        block_size=block_size,
        nnz_offdiagonal=sum(t.nnz for t in tiles),
        offdiagonal_sum_of_squares=1.0,
        tiles=tiles,
    )


def tile(b: int, c: int, layout: str, nnz: int) -> TileInfo:
    return TileInfo(row_block=b, col_block=c, layout=layout, path="unused", nnz=nnz, sum_of_squares=1.0)


def test_auto_picks_the_route_with_less_work():
    """Dense tiles cost B_b·B_c, sparse ones their non-zeros at the sparse rate, likes two sparse products."""
    dense = result_with([tile(0, 0, "dense", 9_000), tile(0, 1, "dense", 9_000), tile(1, 1, "dense", 9_000)])
    # 4 × 100² = 40,000 GEMM entries against 2 × 16 × likes.
    assert choose_x_products("auto", dense, n_likes=1_000) == "likes"
    assert choose_x_products("auto", dense, n_likes=2_000) == "tiles"
    sparse = result_with([tile(0, 0, "sparse", 500), tile(0, 1, "sparse", 300)])
    # Tiles: 16 × (500 + 2 × 300); likes: 2 × 16 × likes.
    assert choose_x_products("auto", sparse, n_likes=500) == "likes"
    assert choose_x_products("auto", sparse, n_likes=600) == "tiles"
    assert choose_x_products("tiles", dense, n_likes=1) == "tiles"
    assert choose_x_products("likes", sparse, n_likes=10**9) == "likes"


@pytest.fixture
def x_work(client, tmp_path, tiny_input):
    work = tmp_path / "work"
    ingest = ingest_ratings(client, str(tiny_input), work, block_size=100)
    cooccurrence_blocks(client, ingest, work)
    return work, ingest


def test_liked_products_on_the_cluster_match_scipy(client, x_work):
    """The sharded Sᵀ(S V) over ingested blocks equals X V from scipy's SᵀS of the same likes."""
    _, ingest = x_work
    products = LikedGramProducts(client, ingest, "cpu", None)
    grid = ingest.item_grid
    vectors = torch.randn(ingest.n_items, 5, generator=torch.Generator().manual_seed(0))
    futures = [client.scatter(vectors[start:stop]) for _, start, stop in grid]
    ours = torch.cat(client.gather(products.products(futures))).double().numpy()
    user_blocks = client.gather(products.user_blocks)
    s = sp.vstack([sp.csr_matrix(b.matrix.to_dense().numpy()) for b in user_blocks]).tocsr()
    assert s.nnz == products.n_likes == ingest.n_likes
    np.testing.assert_allclose(ours, (s.T @ s) @ vectors.double().numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("model", "solver"), [("cooccurrence", "gradient"), ("nmf", "mu")])
def test_both_routes_train_alike(client, x_work, model, solver):
    """Tiles or likes, the same model trains to the same losses and factors (up to float32 rounding)."""
    work, _ = x_work
    runs = {
        route: train_factors(client, work, settings(model, solver, epochs=5, x_products=route))
        for route in ("tiles", "likes")
    }
    tiles, likes = ([r.loss for r in runs[route].history] for route in ("tiles", "likes"))
    assert likes == pytest.approx(tiles, rel=1e-4)
    for name, values in factors(runs["likes"]).items():
        np.testing.assert_allclose(values, factors(runs["tiles"])[name], rtol=1e-3, atol=1e-4)
