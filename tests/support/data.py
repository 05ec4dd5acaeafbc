"""Ratings sets of the tests: written as partitioned Parquet, or read from ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mf_dist.bench.quality_data import MOVIELENS_100K
from mf_dist.bench.synthetic import write_partitions

__all__ = ["MOVIELENS_100K", "write_input"]


def write_input(frame: pd.DataFrame, directory: Path, n_files: int = 3) -> Path:
    write_partitions(frame, directory, n_files)
    return directory
