"""CPU/CUDA parity (mf_dist.bench.gpu_check.parity): every registered model × solver is a case,
the comparison's arithmetic, and on a GPU every case trained on CUDA against the CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mf_dist.bench.gpu_check.parity import (
    LOSS_RTOL,
    TABLE_RTOL,
    compare_devices,
    compare_runs,
    parity_cases,
    prepare_parity_data,
    relative_difference,
)
from mf_dist.registry import MODELS


def test_every_registered_model_and_solver_is_a_case():
    cases = parity_cases()
    assert {(case.model, case.solver) for case in cases} == {
        (spec.name, solver) for spec in MODELS.values() for solver in spec.solvers
    }
    labels = [case.label for case in cases]
    assert len(labels) == len(set(labels))
    assert {"implicit/als/cg", "implicit/als/cholesky", "nmf/mu/ratings"} <= set(labels)
    for case in cases:
        assert case.settings("cuda").device == "cuda"


def test_identical_runs_compare_as_equal_and_drift_is_measured():
    tables = {"items": np.arange(12, dtype=np.float32).reshape(4, 3)}
    same = compare_runs("m/s", ("cpu", "cpu"), ([3.0, 2.0], [3.0, 2.0]), (tables, tables))
    assert same.passed and same.loss_rel_diff == 0 and same.table_rel_diffs == {"items": 0.0}

    drifted = {"items": tables["items"] * (1 + TABLE_RTOL / 2)}
    close = compare_runs(
        "m/s", ("cpu", "cuda"), ([3.0, 2.0], [3.0, 2.0 * (1 + LOSS_RTOL / 2)]), (tables, drifted)
    )
    assert close.passed
    assert close.table_rel_diffs["items"] == pytest.approx(TABLE_RTOL / 2, rel=1e-3)

    far = {"items": tables["items"] * (1 + 2 * TABLE_RTOL)}
    assert not compare_runs("m/s", ("cpu", "cuda"), ([3.0, 2.0], [3.0, 2.0]), (tables, far)).passed
    assert not compare_runs("m/s", ("cpu", "cuda"), ([3.0, 2.0], [3.0, 2.1]), (tables, tables)).passed
    assert not compare_runs("m/s", ("cpu", "cuda"), ([3.0, 2.0], [3.0, math.nan]), (tables, tables)).passed
    assert not compare_runs("m/s", ("cpu", "cuda"), ([3.0, 2.0], [3.0]), (tables, tables)).passed
    assert not compare_runs("m/s", ("cpu", "cuda"), ([1.0], [1.0]), (tables, {})).passed
    assert relative_difference(np.zeros(3), np.zeros(2)) == math.inf


@pytest.fixture(scope="module")
def parity_work(clients, tmp_path_factory):
    return prepare_parity_data(clients[2], tmp_path_factory.mktemp("parity"))


def test_one_case_against_itself_on_the_cpu(clients, parity_work):
    """The dry run's comparison, on one case: the CPU twice gives the same factors exactly."""
    case = next(case for case in parity_cases() if case.label == "implicit/als/cg")
    (comparison,) = compare_devices(clients[2], parity_work, "cpu", [case])
    assert comparison.passed and comparison.loss_rel_diff == 0
    assert set(comparison.table_rel_diffs) == {"users", "items"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", parity_cases(), ids=lambda case: case.label)
def test_cuda_matches_the_cpu(clients, parity_work, case):
    (comparison,) = compare_devices(clients[2], parity_work, "cuda", [case])
    assert comparison.passed, comparison
