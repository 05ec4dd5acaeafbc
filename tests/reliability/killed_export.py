"""``python -m tests.reliability.killed_export POINT ARGS``: ``mf-dist ARGS``, SIGKILLed inside the export.

The process runs the real command and sends itself ``SIGKILL`` when its
export stage reaches ``POINT``, so a test can see exactly what a job killed
there leaves behind:

``parts-written``
    the first table's Parquet parts are written under ``runs/.<id>.partial/``,
    its manifest is not;
``before-latest``
    every table is complete and renamed to ``runs/<id>/``, and no ``LATEST``
    has moved yet.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import mf_dist.stages.export
from mf_dist.cli import main

# The function of mf_dist.stages.export whose call marks each point.
POINTS = {"parts-written": "write_loss_curve_png", "before-latest": "publish_run"}


def die(*args: Any, **kwargs: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    point, *arguments = sys.argv[1:]
    setattr(mf_dist.stages.export, POINTS[point], die)
    sys.argv = ["mf-dist", *arguments]
    main()
