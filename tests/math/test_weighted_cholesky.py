"""Row-wise exact weighted least squares, both implementations, against NumPy's dense solve."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mf_dist.errors import TrainingError
from mf_dist.solvers import weighted_cholesky
from tests.support.devices import DEVICES

IMPLEMENTATIONS = [
    pytest.param(weighted_cholesky.batched_rows, "batched", id="batched"),
    pytest.param(weighted_cholesky.fused_rows, "fused", id="fused"),
]


def block(
    n_rows: int, n_cols: int, width: int, seed: int, *, weighted: bool, dtype: torch.dtype = torch.float64
) -> dict:
    """A random block (row 0 empty, the last row full): weights, ridges and a base B (zero or YᵀY + I)."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_rows, n_cols, generator=generator) < 0.35
    mask[0] = False
    mask[-1] = True
    rows, cols = mask.nonzero(as_tuple=True)
    features = torch.randn(n_cols, width, generator=generator, dtype=torch.float64)
    confidence = 1 + 4 * torch.rand(len(rows), generator=generator, dtype=torch.float64)
    base = (
        features.T @ features + torch.eye(width, dtype=torch.float64)
        if weighted
        else torch.zeros(width, width)
    )
    counts = torch.bincount(rows, minlength=n_rows).double()
    return {
        "rows": rows,
        "cols": cols,
        "gram_weights": (confidence - 1).to(dtype) if weighted else None,
        "rhs_weights": (confidence if weighted else torch.randn(len(rows), generator=generator)).to(dtype),
        "ridge": (torch.zeros(n_rows) if weighted else 0.3 * counts.clamp_min(1)).to(dtype),
        "col_features": features.to(dtype),
        "base": base.to(dtype),
        "n_rows": n_rows,
    }


def dense_solution(case: dict) -> np.ndarray:
    """Each row's A_r and b_r built densely in float64 and solved by NumPy (rows without entries: 0)."""
    rows, cols = case["rows"].numpy(), case["cols"].numpy()
    y = case["col_features"].double().numpy()
    weights = None if case["gram_weights"] is None else case["gram_weights"].double().numpy()
    solution = np.zeros((case["n_rows"], y.shape[1]))
    for row in range(case["n_rows"]):
        entries = rows == row
        if not entries.any():
            continue
        features = y[cols[entries]]
        scaled = features if weights is None else weights[entries, None] * features
        a = case["base"].double().numpy() + scaled.T @ features
        a += float(case["ridge"][row]) * np.eye(y.shape[1])
        solution[row] = np.linalg.solve(a, features.T @ case["rhs_weights"].double().numpy()[entries])
    return solution


def run(implementation, case: dict, device: str) -> np.ndarray:
    moved = {name: value.to(device) if torch.is_tensor(value) else value for name, value in case.items()}
    solution = implementation(**moved)
    assert solution.device.type == torch.device(device).type
    assert solution.dtype == case["col_features"].dtype
    return solution.cpu().double().numpy()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("implementation", "kind"), IMPLEMENTATIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["explicit", "implicit"])
def test_rows_equal_the_dense_solve(implementation, kind, weighted, device):
    if kind == "fused" and device != "cpu":
        pytest.skip("the fused loop runs on the CPU only")
    case = block(9, 14, 5, seed=3, weighted=weighted)
    solution = run(implementation, case, device)
    np.testing.assert_allclose(solution, dense_solution(case), rtol=1e-9, atol=1e-11)
    assert np.all(solution[0] == 0)


@pytest.mark.parametrize("weighted", [False, True], ids=["explicit", "implicit"])
def test_float32_blocks_agree_between_implementations_and_with_float64(weighted):
    """Realistic width and rows longer than the width, in float32: near the float64 answer."""
    case = block(40, 300, 65, seed=11, weighted=weighted, dtype=torch.float32)
    reference = dense_solution(case)
    scale = np.abs(reference).max()
    for implementation in (weighted_cholesky.fused_rows, weighted_cholesky.batched_rows):
        assert np.abs(run(implementation, case, "cpu") - reference).max() < 1e-3 * scale


@pytest.mark.parametrize(("implementation", "kind"), IMPLEMENTATIONS)
def test_a_singular_row_gets_a_ridge_not_a_failure(implementation, kind):
    """Two identical entries and no ridge: rank one of four; a small ridge gives a finite answer."""
    features = torch.tensor([[1.0, 2.0, 0.0, 1.0], [0.5, 0.0, 1.0, 1.0]], dtype=torch.float64)
    case = {
        "rows": torch.tensor([0, 0, 1, 1, 1, 1]),
        "cols": torch.tensor([0, 0, 0, 1, 0, 1]),
        "gram_weights": None,
        "rhs_weights": torch.tensor([1.0, 1.0, 2.0, 1.0, 2.0, 1.0], dtype=torch.float64),
        "ridge": torch.tensor([0.0, 1.0], dtype=torch.float64),
        "col_features": features,
        "base": torch.zeros(4, 4, dtype=torch.float64),
        "n_rows": 2,
    }
    solution = run(implementation, case, "cpu")
    assert np.isfinite(solution).all()
    # The regularised row is exact; the singular one still reproduces its targets.
    f = features[[0, 1, 0, 1]].numpy()
    expected = np.linalg.solve(f.T @ f + np.eye(4), f.T @ np.array([2.0, 1.0, 2.0, 1.0]))
    np.testing.assert_allclose(solution[1], expected, rtol=1e-9)
    np.testing.assert_allclose(features[0].numpy() @ solution[0], 1.0, rtol=1e-4)


def test_non_finite_factors_are_a_training_error():
    case = block(5, 8, 3, seed=1, weighted=False)
    case["col_features"][2, 1] = float("nan")
    with pytest.raises(TrainingError, match="not positive definite"):
        weighted_cholesky.fused_rows(**case)


@pytest.mark.parametrize(("device", "expected"), [("cpu", "fused"), ("meta", "batched")])
def test_cpu_tensors_take_the_fused_loop_and_others_the_batched_one(monkeypatch, device, expected):
    """``meta`` tensors stand for any other device: only the dispatch is under test."""
    case = block(7, 9, 3, seed=2, weighted=True)
    case = {name: value.to(device) if torch.is_tensor(value) else value for name, value in case.items()}
    calls = []
    monkeypatch.setattr(weighted_cholesky, "fused_rows", lambda *args: calls.append("fused"))
    monkeypatch.setattr(weighted_cholesky, "batched_rows", lambda *args: calls.append("batched"))
    weighted_cholesky.cholesky_rows(**case)
    assert calls == [expected]
