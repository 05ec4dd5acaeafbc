"""Where the repository and the shared data sets are."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
