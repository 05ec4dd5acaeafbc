"""Entry point of one side's process: ``python -m mf_dist.bench.side CONTEXT.json SIDE RESULT.json``."""

from __future__ import annotations

import sys
from pathlib import Path

from mf_dist.bench.measure import SideContext, run_side_here
from mf_dist.bench.suites import SUITES


def main(argv: list[str]) -> None:
    context_path, side, result_path = argv
    context = SideContext.model_validate_json(Path(context_path).read_text())
    suite = SUITES[context.suite]
    body = suite.ours if side == "ours" else suite.reference
    if body is None:
        raise SystemExit(f"suite {context.suite} has no {side} side")
    result = run_side_here(body, context)
    Path(result_path).write_text(result.model_dump_json(indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
