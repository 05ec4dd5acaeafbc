"""Least-squares row solves for ALS: per-row normal equations, batched Cholesky and CG.

Every row r of a factor block solves its own k × k system A_r x_r = b_r. The
systems are assembled from the observed entries of the row (sorted by row)
and solved as one batch: exactly by Cholesky (``torch.linalg.cholesky_ex``),
or approximately by a few conjugate-gradient steps started from the current
factors (Takács, Pilászy & Tikk, RecSys 2011), which never forms A_r.

Memory: an assembled batch holds rows × k × k floats, so callers cut a block
into :func:`row_chunks` whose systems fit ``budget_bytes``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

# Sparse CSR matmul in torch warns that it is beta on every first use, in every worker.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

# Rows × k² floats of assembled systems per chunk: 256 MiB keeps a k = 1024
# solve at 64 rows per chunk and a k = 64 block in one piece.
DEFAULT_BUDGET_BYTES = 256 * 1024 * 1024

# Floats of gathered entry features held at once while assembling.
ENTRY_BUDGET_FLOATS = 32 * 1024 * 1024

# A system that is not numerically positive definite is factored again with
# this fraction of its mean |diagonal| (at least 1) added to the diagonal.
SINGULAR_RIDGE = 1e-6

# Padded lengths of the batched Gram products grow by this factor: finer
# steps mean less padding but more, smaller GEMMs (1.25 measured best on
# MovieLens 100K; 2 was 50% slower).
PAD_GROWTH = 1.25


def row_chunks(n_rows: int, rank: int, budget_bytes: int | None = None) -> Iterator[tuple[int, int]]:
    """Half-open row ranges whose k × k systems (float32) fit ``budget_bytes`` together.

    The default budget is :data:`DEFAULT_BUDGET_BYTES`, read at call time.
    """
    per_row = max(1, rank * rank * 4)
    size = max(1, (budget_bytes or DEFAULT_BUDGET_BYTES) // per_row)
    for start in range(0, n_rows, size):
        yield start, min(start + size, n_rows)


def entry_ranges(sorted_rows: Tensor, start: int, stop: int) -> tuple[int, int]:
    """The slice of entries (sorted by row) whose row lies in ``[start, stop)``."""
    bounds = torch.searchsorted(sorted_rows, torch.tensor([start, stop], device=sorted_rows.device))
    return int(bounds[0]), int(bounds[1])


def row_gram_sums(
    rows: Tensor, cols: Tensor, col_features: Tensor, n_rows: int, weights: Tensor | None = None
) -> Tensor:
    """Σ_e w_e f_{c_e} f_{c_e}ᵀ grouped by row: (n_rows × k × k).

    ``rows`` (e,) int64 sorted ascending, ``cols`` (e,) int64 indexing
    ``col_features`` (m × k); ``weights`` (e,) or None for 1.

    Row r's sum is F_rᵀ diag(w_r) F_r with F_r its entries' features, so rows
    are grouped by entry count, each group's F_r padded with zero rows to a
    common length, and every group is one batched GEMM: compute-bound BLAS
    work, 3-5× faster on a CPU than a sparse (rows × columns) by dense
    (columns × k²) product, which streams k² floats per entry. Lengths grow
    by :data:`PAD_GROWTH`, so padding adds at most a quarter to the work.
    """
    k = col_features.shape[1]
    dtype, device = col_features.dtype, col_features.device
    gram = torch.zeros(n_rows, k, k, dtype=dtype, device=device)
    if len(rows) == 0:
        return gram
    counts = torch.bincount(rows, minlength=n_rows)
    starts = torch.cumsum(counts, 0) - counts
    lengths = padded_lengths(counts)
    for length in torch.unique(lengths[counts > 0]).tolist():
        members = torch.nonzero(lengths == length).squeeze(1)
        per_chunk = max(1, ENTRY_BUDGET_FLOATS // (length * k))
        offsets = torch.arange(length, device=device)
        for first in range(0, len(members), per_chunk):
            chunk = members[first : first + per_chunk]
            inside = offsets[None, :] < counts[chunk][:, None]
            entry = torch.where(inside, starts[chunk][:, None] + offsets[None, :], 0)
            features = col_features[cols[entry]] * inside[..., None].to(dtype)
            weighted = features if weights is None else features * weights[entry].to(dtype)[..., None]
            gram[chunk] = weighted.transpose(1, 2) @ features
    return gram


def padded_lengths(counts: Tensor) -> Tensor:
    """Each count rounded up to the next length of the series ⌈PAD_GROWTHⁿ⌉, a multiple of 4 (0 stays 0)."""
    lengths = torch.zeros_like(counts)
    present = counts > 0
    exponent = torch.ceil(torch.log(counts[present].double()) / math.log(PAD_GROWTH))
    lengths[present] = torch.ceil(PAD_GROWTH**exponent / 4).long() * 4
    # Guards against log/pow rounding leaving a length one short.
    return torch.maximum(lengths, counts)


def csr_matrix(rows: Tensor, cols: Tensor, values: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """The (n_rows × n_cols) sparse CSR matrix with ``values`` at (``rows``, ``cols``).

    ``rows`` (e,) int64 must be sorted ascending; the entries keep their given
    order, so ``.values()`` of the result (and of SDDMM results on it) lines
    up with ``values`` entry by entry. Built from row counts in O(e): no sort.
    """
    return with_values(row_pointers(rows, n_rows), cols, values, n_rows, n_cols)


def row_pointers(rows: Tensor, n_rows: int) -> Tensor:
    """CSR row pointers (n_rows + 1,) int64 of entries whose ``rows`` (e,) are sorted ascending."""
    counts = torch.bincount(rows, minlength=n_rows) if len(rows) else rows.new_zeros(n_rows)
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow


def with_values(crow: Tensor, cols: Tensor, values: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """A CSR matrix on an existing pattern (``crow`` (n_rows + 1,), ``cols`` (e,)) with new ``values`` (e,).

    Shares the index tensors: no copy. The invariants were established when the
    pattern was built, so they are not re-checked on every CG step.
    """
    return torch.sparse_csr_tensor(crow, cols, values, (n_rows, n_cols), check_invariants=False)


def sampled_row_dots(pattern: Tensor, row_vectors: Tensor, col_vectors: Tensor) -> Tensor:
    """s_e = x_{r_e}ᵀ y_{c_e} for every entry e of the CSR ``pattern`` (SDDMM), in entry order (e,).

    ``row_vectors`` (n × k) and ``col_vectors`` (m × k) of ``pattern``'s dtype.
    ``torch.sparse.sampled_addmm`` computes only the sampled dot products and
    never materialises the e × k gathered rows (≈50× faster on a CPU than
    gathering both sides). It is given ``col_vectors.T`` as a transposed view of
    the row-major (m × k) tensor, so that each dot product reads contiguous rows
    (a contiguous k × m copy is >10× slower). ``pattern``'s own values are
    multiplied by 0 (β = 0), so they must be finite.
    """
    sampled = torch.sparse.sampled_addmm(pattern, row_vectors, col_vectors.contiguous().T, beta=0.0)
    return sampled.values()


def row_vector_sums(rows: Tensor, features: Tensor, values: Tensor, n_rows: int) -> Tensor:
    """Σ_e v_e f_e grouped by row: (n_rows × k)."""
    total = torch.zeros(n_rows, features.shape[1], dtype=features.dtype, device=features.device)
    total.index_add_(0, rows, features * values[:, None])
    return total


def solve_normal_equations(gram: Tensor, rhs: Tensor) -> Tensor:
    """Solve A_r x_r = b_r for a batch of symmetric positive definite systems.

    ``gram`` (n × k × k), ``rhs`` (n × k) → (n × k). Rows whose system is not
    numerically positive definite are retried with a small ridge scaled to
    their diagonal, so a single degenerate row cannot fail a whole block.
    """
    if gram.shape[0] == 0:
        return rhs.clone()
    factor, info = torch.linalg.cholesky_ex(gram)
    bad = info != 0
    if bool(bad.any()):
        eye = torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)
        scale = gram[bad].diagonal(dim1=1, dim2=2).abs().mean(dim=1).clamp_min(1.0)
        factor[bad] = torch.linalg.cholesky(gram[bad] + SINGULAR_RIDGE * scale[:, None, None] * eye)
    return torch.cholesky_solve(rhs.unsqueeze(2), factor).squeeze(2)


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor], rhs: Tensor, initial: Tensor, steps: int
) -> Tensor:
    """``steps`` batched conjugate-gradient iterations on A_r x_r = b_r from ``initial``.

    ``matvec(X)`` returns the rows A_r x_r for a batch X (n × k); A_r must be
    symmetric positive definite. ``matvec`` may return the same buffer on
    every call: each result is used up before the next call. Rows whose
    residual vanishes stop moving. Returns a new (n × k) tensor.

    The n × k iterates are updated in place and the row dot products go
    through one scratch buffer: large temporaries are expensive on Dask
    workers (see :func:`mf_dist.models.implicit.cg_update_rows`).
    """
    x = initial.clone()
    residual = rhs - matvec(x)
    direction = residual.clone()
    scratch = torch.empty_like(residual)

    def row_dots(a: Tensor, b: Tensor) -> Tensor:
        return torch.mul(a, b, out=scratch).sum(dim=1)

    squared = row_dots(residual, residual)
    for _ in range(steps):
        applied = matvec(direction)
        curvature = row_dots(direction, applied)
        alpha = torch.where(curvature > 0, squared / curvature.clamp_min(1e-30), torch.zeros_like(squared))
        x.addcmul_(alpha[:, None], direction)
        residual.addcmul_(alpha[:, None], applied, value=-1)
        new_squared = row_dots(residual, residual)
        beta = torch.where(squared > 0, new_squared / squared.clamp_min(1e-30), torch.zeros_like(squared))
        direction.mul_(beta[:, None]).add_(residual)
        squared = new_squared
    return x
