"""The benchmark's scales and suite names: what the CLI needs before it imports any suite.

``mf-dist --help`` and every other command import this, so it holds plain
data only; the suites themselves (torch, Dask, scipy) load when a bench runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SUITE_NAMES = (
    "cooccurrence",
    "implicit-als",
    "explicit-als",
    "nmf",
    "cooccurrence-embedding",
    "recommend",
    "end-to-end",
    "end-to-end-s3",
)
"""The names of :data:`mf_dist.bench.suites.SUITES`, in order (a test keeps them equal)."""

ScaleName = Literal["tiny", "small", "ml20m"]
LIKE_THRESHOLD = 4.0
DATA_SEED = 20
RATING_INTERCEPT = 3.86
"""μ of :func:`mf_dist.bench.synthetic.synthetic_ratings` for every scale: at ML-20M's shape it makes
35.5 % of ratings likes (≥ 4), about 7.1 M of 20 M as in the issue's reference set (3.6, the
generator's default, gives 24.7 %)."""


@dataclass(frozen=True)
class Scale:
    """The shape of one benchmark data set and the block size the pipeline uses on it."""

    name: ScaleName
    n_ratings: int
    n_users: int
    n_items: int
    block_size: int


SCALES: dict[str, Scale] = {
    # Seconds: enough for CI to prove every suite runs end to end.
    "tiny": Scale("tiny", 30_000, 600, 1_000, 128),
    # A tenth of ML-20M's ratings on a tenth of its users and ~37% of its items.
    "small": Scale("small", 2_000_000, 13_850, 10_000, 2048),
    # MovieLens 20M's shape: 138,493 users × 26,744 items, 20,000,263 ratings.
    "ml20m": Scale("ml20m", 20_000_263, 138_493, 26_744, 4096),
}
