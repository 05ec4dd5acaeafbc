"""Row-wise weighted CG, both implementations, against a plain NumPy CG on dense systems."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mf_dist.solvers import weighted_cg
from tests.support.devices import DEVICES

IMPLEMENTATIONS = [
    pytest.param(weighted_cg.batched_rows, "batched", id="batched"),
    pytest.param(weighted_cg.fused_rows, "fused", id="fused"),
]


def block(n_rows: int, n_cols: int, rank: int, seed: int, dtype: torch.dtype = torch.float64) -> dict:
    """A random CSR block (row 0 empty, the last row full), weights, a start and a base B = YᵀY + I."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_rows, n_cols, generator=generator) < 0.35
    mask[0] = False
    mask[-1] = True
    rows, cols = mask.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=n_rows)
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    confidence = 1 + 4 * torch.rand(len(rows), generator=generator, dtype=torch.float64)
    y = torch.randn(n_cols, rank, generator=generator, dtype=torch.float64)
    return {
        "crow": crow,
        "cols": cols,
        "gram_weights": (confidence - 1).to(dtype),
        "rhs_weights": confidence.to(dtype),
        "start": torch.randn(n_rows, rank, generator=generator, dtype=torch.float64).to(dtype),
        "col_vectors": y.to(dtype),
        "base": (y.T @ y + torch.eye(rank, dtype=torch.float64)).to(dtype),
    }


def block_with_counts(counts: list[int], n_cols: int, rank: int, seed: int) -> dict:
    """A random CSR block whose rows hold exactly ``counts`` entries (distinct columns, sorted)."""
    generator = torch.Generator().manual_seed(seed)
    cols = torch.cat([torch.randperm(n_cols, generator=generator)[:count].sort().values for count in counts])
    crow = torch.tensor([0, *np.cumsum(counts)], dtype=torch.int64)
    confidence = 1 + 4 * torch.rand(len(cols), generator=generator, dtype=torch.float64)
    y = torch.randn(n_cols, rank, generator=generator, dtype=torch.float64)
    return {
        "crow": crow,
        "cols": cols,
        "gram_weights": confidence - 1,
        "rhs_weights": confidence,
        "start": torch.randn(len(counts), rank, generator=generator, dtype=torch.float64),
        "col_vectors": y,
        "base": y.T @ y + torch.eye(rank, dtype=torch.float64),
    }


def dense_cg(case: dict, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Textbook CG on each row's dense A_r and b_r (float64), and the scores at the solution."""
    crow, cols = case["crow"].numpy(), case["cols"].numpy()
    y = case["col_vectors"].double().numpy()
    base = case["base"].double().numpy()
    solution = case["start"].double().numpy().copy()
    scores = np.zeros(len(cols))
    for row in range(len(crow) - 1):
        entries = slice(crow[row], crow[row + 1])
        if crow[row] == crow[row + 1]:
            solution[row] = 0
            continue
        features = y[cols[entries]]
        a = base + features.T @ (case["gram_weights"].double().numpy()[entries, None] * features)
        b = features.T @ case["rhs_weights"].double().numpy()[entries]
        x = solution[row]
        r = b - a @ x
        p = r.copy()
        for _ in range(steps):
            step = (r @ r) / (p @ a @ p)
            x = x + step * p
            new_r = r - step * (a @ p)
            p = new_r + (new_r @ new_r) / (r @ r) * p
            r = new_r
        solution[row] = x
        scores[entries] = features @ x
    return solution, scores


def run(implementation, case: dict, steps: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    moved = {name: value.to(device) for name, value in case.items()}
    solution, scores = implementation(**moved, steps=steps)
    assert solution.device.type == scores.device.type == torch.device(device).type
    assert solution.dtype == scores.dtype == case["col_vectors"].dtype
    return solution.cpu().double().numpy(), scores.cpu().double().numpy()


def devices_for(kind: str) -> list:
    return DEVICES if kind == "batched" else ["cpu"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("implementation", "kind"), IMPLEMENTATIONS)
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_each_step_equals_textbook_cg_on_the_dense_systems(implementation, kind, steps, device):
    if device not in devices_for(kind):
        pytest.skip("the fused loop runs on the CPU only")
    case = block(9, 14, 5, seed=steps)
    solution, scores = run(implementation, case, steps, device)
    expected, expected_scores = dense_cg(case, steps)
    np.testing.assert_allclose(solution, expected, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-9, atol=1e-11)
    assert np.all(solution[0] == 0)


@pytest.mark.parametrize(("implementation", "kind"), IMPLEMENTATIONS)
def test_rank_many_steps_reach_the_exact_solution(implementation, kind):
    case = block(6, 11, 4, seed=7)
    solution, _ = run(implementation, case, 4, "cpu")
    exact = np.zeros_like(solution)
    crow, cols = case["crow"].numpy(), case["cols"].numpy()
    y = case["col_vectors"].numpy()
    for row in range(1, 6):
        features = y[cols[crow[row] : crow[row + 1]]]
        weights = case["gram_weights"].numpy()[crow[row] : crow[row + 1]]
        a = case["base"].numpy() + features.T @ (weights[:, None] * features)
        exact[row] = np.linalg.solve(a, features.T @ case["rhs_weights"].numpy()[crow[row] : crow[row + 1]])
    np.testing.assert_allclose(solution, exact, rtol=1e-7, atol=1e-9)


def test_float32_blocks_agree_between_implementations_and_with_float64():
    """A block of realistic width in float32: both implementations stay near the float64 answer."""
    case = block(40, 300, 64, seed=11, dtype=torch.float32)
    reference, _ = dense_cg(case, 3)
    fused, fused_scores = run(weighted_cg.fused_rows, case, 3, "cpu")
    batched, batched_scores = run(weighted_cg.batched_rows, case, 3, "cpu")
    scale = np.abs(reference).max()
    assert np.abs(fused - reference).max() < 1e-4 * scale
    assert np.abs(batched - reference).max() < 1e-4 * scale
    tolerance = 1e-3 * np.abs(batched_scores).max()
    np.testing.assert_allclose(fused_scores, batched_scores, rtol=1e-3, atol=tolerance)


def test_cpu_tensors_take_the_fused_loop():
    case = block(7, 9, 3, seed=2)
    chosen, _ = weighted_cg.cg_rows(**case, steps=2)
    fused, _ = weighted_cg.fused_rows(**case, steps=2)
    assert torch.equal(chosen, fused)
    assert not torch.equal(chosen, case["start"])


@pytest.mark.parametrize("rank", [5, 6, 7])
def test_fused_rows_of_every_length_against_textbook_cg(rank):
    """Rows of 1–3 entries (no group of four), lengths around the groups and past the prefetch
    distance, ranks that are not multiples of four: each row's loop tail and remainders.

    Ranks above the 3 steps, so that no row's CG ends early (the textbook loop has no stop).
    """
    counts = [1, 2, 3, 0, 4, 5, 6, 7, 8, 15, 16, 17, 19, 20, 21, 23, 37, 3]
    case = block_with_counts(counts, n_cols=40, rank=rank, seed=rank)
    solution, scores = run(weighted_cg.fused_rows, case, 3, "cpu")
    expected, expected_scores = dense_cg(case, 3)
    np.testing.assert_allclose(solution, expected, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-9, atol=1e-11)
