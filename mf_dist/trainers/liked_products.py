"""X V = Sᵀ(S V) from the likes: the co-occurrence products without reading X.

S is the binary users × items liked matrix and X = SᵀS, so every product
with X that a trainer needs factors through S:

    X V   = Sᵀ (S V)                      (NMF of X, diagonal included)
    X₀ V  = Sᵀ (S V) − diag(d) V          (X without its diagonal, d_i = likes of item i)

Two sparse products with S cost 2·likes·k multiply-adds; a product with X's
tiles costs nnz(X)·k, and X = SᵀS has far more non-zeros than S (ML-20M:
490 M against 7.1 M likes). :func:`choose_x_products` compares the two
with the stored tiles' real layouts and picks the cheaper.

On the workers S lives twice, as CSR row blocks of S (one per user block,
all items as columns) and of Sᵀ (one per item block, all users as columns):
O(likes) memory, against O(nnz(X)) for the tiles. An epoch's products are
one task per user block, P_u = S_u V, then one per item block,
(SᵀP)_b = Σ_u (S_u)_bᵀ P_u; only factor-sized blocks travel.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from distributed import Client, Future
from torch import Tensor

from mf_dist.runtime.cluster import compute_device
from mf_dist.settings import TrainSettings, XProducts
from mf_dist.solvers.normal_equations import csr_matrix
from mf_dist.storage.ingested import IngestResult
from mf_dist.storage.tiles import CooccurrenceResult
from mf_dist.trainers.base import TaskSubmitter
from mf_dist.trainers.ratings_sides import SideEntries, load_ratings_sides

logger = logging.getLogger(__name__)

# Work per stored entry of a sparse (CSR × dense) product against one
# multiply-add of a dense GEMM, measured with torch on a CPU (X's sparse
# tiles: 6 M entries/s per row of k = 300; S's likes 5 M/s; dense tiles 90 M/s).
SPARSE_ENTRY_COST = 16.0


def tile_product_cost(cooccurrence: CooccurrenceResult) -> float:
    """Dense-GEMM-equivalent work of X₀ V over the stored tiles, per column of V.

    An off-diagonal tile gives two products (X₀_bc V_c and X₀_bcᵀ V_b), a
    diagonal tile one.
    """
    grid = cooccurrence.item_grid
    cost = 0.0
    for tile in cooccurrence.tiles:
        products = 1 if tile.row_block == tile.col_block else 2
        if tile.layout == "dense":
            cost += products * grid.size(tile.row_block) * grid.size(tile.col_block)
        else:
            cost += products * SPARSE_ENTRY_COST * tile.nnz
    return cost


def liked_product_cost(n_likes: int) -> float:
    """Dense-GEMM-equivalent work of Sᵀ(S V), per column of V: two sparse products over the likes."""
    return 2 * SPARSE_ENTRY_COST * n_likes


def choose_x_products(
    setting: XProducts, cooccurrence: CooccurrenceResult, n_likes: int
) -> Literal["tiles", "likes"]:
    """The route for products with X: the one asked for, or for ``auto`` the cheaper one."""
    if setting != "auto":
        return setting
    return "likes" if liked_product_cost(n_likes) < tile_product_cost(cooccurrence) else "tiles"


class ResidentLikes:
    """One row block of S (or of Sᵀ) as a binary CSR tensor on a worker's device, kept for the run.

    Dask cannot serialise sparse CSR tensors, so a block that must move
    travels as its :class:`SideEntries` and is rebuilt on the receiving
    worker's device. ``__sizeof__`` reports the real footprint so that the
    scheduler moves factor blocks to the likes rather than the reverse.
    """

    def __init__(self, entries: SideEntries, n_cols: int, device_preference: str) -> None:
        self.entries = entries
        self.n_cols = n_cols
        self.device_preference = device_preference
        device = compute_device(device_preference)
        ones = torch.ones(len(entries.rows), dtype=torch.float32)
        self.matrix = csr_matrix(entries.rows, entries.cols, ones, entries.n_rows, n_cols).to(device)

    def __reduce__(self) -> tuple:
        return (ResidentLikes, (self.entries, self.n_cols, self.device_preference))

    def __sizeof__(self) -> int:
        return 2 * self.entries.__sizeof__()


def liked_times(likes: ResidentLikes, *blocks: Tensor) -> Tensor:
    """The block of S (or Sᵀ) times the row blocks of F stacked in order: (n_rows × k), CPU float32.

    ``blocks`` together have as many rows as the likes block has columns.
    """
    matrix = likes.matrix
    other = torch.cat(blocks).to(device=matrix.device, dtype=torch.float32)
    return (matrix @ other).cpu()


def like_counts(likes: ResidentLikes) -> Tensor:
    """d_i, the likes of each row of an item block of Sᵀ (= X_ii): (n_rows,) float32."""
    return torch.bincount(likes.entries.rows, minlength=likes.entries.n_rows).to(torch.float32)


def squared_row_sums(likes: ResidentLikes) -> float:
    """Σ_u (likes of u)² over a user block of S: its share of Σ_ij X_ij = ‖S 1‖²."""
    counts = torch.bincount(likes.entries.rows, minlength=likes.entries.n_rows).double()
    return float((counts * counts).sum())


def without_diagonal(product: Tensor, counts: Tensor, vectors: Tensor) -> Tensor:
    """(X₀V)_b = (X V)_b − d_b ⊙ V_b for one item block (n × k, float32)."""
    return product - counts[:, None] * vectors.to(product.dtype)


class LikedGramProducts:
    """Products with S, Sᵀ and X = SᵀS on the cluster, from the likes of each user and item block."""

    def __init__(
        self, client: Client, ingest: IngestResult, device: str, resources: dict[str, float] | None
    ) -> None:
        self.client = client
        self._submit = TaskSubmitter(client, resources)
        sides = load_ratings_sides(client, ingest, liked_only=True, resources=resources)
        self.n_likes = sides.n_entries
        self.user_blocks = [
            self._submit(ResidentLikes, e, ingest.n_items, device) for e in sides.user_blocks()
        ]
        self.item_blocks = [
            self._submit(ResidentLikes, e, ingest.n_users, device) for e in sides.item_blocks()
        ]
        self.counts = [self._submit(like_counts, block) for block in self.item_blocks]

    def total(self) -> float:
        """Σ_ij X_ij (diagonal included) = Σ_u (likes of u)²."""
        return float(sum(self.client.gather([self._submit(squared_row_sums, u) for u in self.user_blocks])))

    def user_products(self, item_vectors: list[Future]) -> list[Future]:
        """(S V)_u for every user block, from V's row blocks over the items (each n_b × k)."""
        return [self._submit(liked_times, block, *item_vectors) for block in self.user_blocks]

    def item_products(self, user_vectors: list[Future]) -> list[Future]:
        """(Sᵀ P)_b for every item block, from P's row blocks over the users."""
        return [self._submit(liked_times, block, *user_vectors) for block in self.item_blocks]

    def products(self, vectors: list[Future]) -> list[Future]:
        """(X V)_b = (Sᵀ(S V))_b for every item block b of V's row blocks ``vectors`` (each n_b × k)."""
        return self.item_products(self.user_products(vectors))

    def offdiagonal_products(self, vectors: list[Future]) -> list[Future]:
        """(X₀ V)_b for every item block: X without its diagonal (the co-occurrence embedding's X₀)."""
        return [
            self._submit(without_diagonal, product, counts, v)
            for product, counts, v in zip(self.products(vectors), self.counts, vectors, strict=True)
        ]


def liked_products_if_cheaper(
    client: Client,
    ingest: IngestResult,
    cooccurrence: CooccurrenceResult,
    settings: TrainSettings,
    resources: dict[str, float] | None,
) -> LikedGramProducts | None:
    """The likes on the workers when ``settings.x_products`` picks them, else None (use the tiles)."""
    route = choose_x_products(settings.x_products, cooccurrence, ingest.n_likes)
    logger.info(
        "products with X from the %s (%s: %d likes, %d non-zeros of X off its diagonal)",
        route,
        settings.x_products,
        ingest.n_likes,
        cooccurrence.nnz_offdiagonal,
    )
    if route == "tiles":
        return None
    return LikedGramProducts(client, ingest, settings.device, resources)
