"""What the ingest stage hands to the later stages: its summary record and the like rule.

The ingest stage writes these files under ``<work>/ingest/``; the trainers and
later stages read them through this module only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from mf_dist.blocks import BlockGrid
from mf_dist.storage.schema import INGEST_DIR, ratings_block_name
from mf_dist.storage.store import join, read_bytes

HOLDOUT_DIR = "holdout"


class IngestResult(BaseModel):
    """What the ingest stage wrote; later stages read only these paths."""

    directory: str
    files: list[str]
    fingerprint: str
    n_users: int
    n_items: int
    n_ratings: int
    n_likes: int
    block_size: int
    n_held_out: int = 0
    holdout: float = 0.0
    implicit: bool
    like_threshold: float | None
    global_mean: float
    duplicates_policy: str
    duplicates_resolved: int
    user_column: str
    item_column: str
    user_id_type: str
    item_id_type: str

    @property
    def users_path(self) -> str:
        return join(self.directory, "users.parquet")

    @property
    def items_path(self) -> str:
        return join(self.directory, "items.parquet")

    @property
    def user_grid(self) -> BlockGrid:
        return BlockGrid(self.n_users, self.block_size)

    @property
    def item_grid(self) -> BlockGrid:
        return BlockGrid(self.n_items, self.block_size)

    def ratings_path(self, user_block: int) -> str:
        return join(self.directory, "ratings", ratings_block_name(user_block))

    def holdout_path(self, user_block: int) -> str:
        """The held-out ratings of one user block (empty unless ``holdout`` > 0)."""
        return join(self.directory, HOLDOUT_DIR, ratings_block_name(user_block))


def liked_mask(ratings: np.ndarray, like_threshold: float | None) -> np.ndarray:
    """Which ratings count as "liked" in S: all, or those >= the threshold."""
    if like_threshold is None:
        return np.ones(len(ratings), dtype=bool)
    return ratings >= like_threshold


def load_ingest_result(work_dir: str | Path) -> IngestResult:
    """Read the summary an earlier ingest wrote (``work_dir``: a path or URL)."""
    return IngestResult.model_validate(
        json.loads(read_bytes(join(str(work_dir), INGEST_DIR, "summary.json")))
    )
