"""``mf-dist ann PATH --kind faiss|hnsw``: build and publish the ANN index of an items table."""

from __future__ import annotations

import time
from typing import Annotated, Literal, Optional

import typer
from rich.console import Console

from mf_dist.commands.options import SchedulerOption, WorkersOption

console = Console()

AnnKind = Literal["faiss", "hnsw"]


def ann(
    path: Annotated[
        str,
        typer.Argument(help="Output directory, items table (e.g. out/items) or one of its runs; or its URL."),
    ],
    kind: Annotated[AnnKind, typer.Option(help="faiss (IndexHNSWFlat) or hnsw (hnswlib).")] = "faiss",
    output: Annotated[
        Optional[str], typer.Option(help="Where ann/ goes (default: beside the items table).")
    ] = None,
    workers: WorkersOption = None,
    scheduler: SchedulerOption = None,
) -> None:
    """An HNSW inner-product index of the items, for ranking items for a user (docs/tables.md, `ann`)."""
    from mf_dist.runtime.cluster import open_client
    from mf_dist.stages.ann import build_ann
    from mf_dist.storage.output_lock import exclusive_output
    from mf_dist.storage.reader import find_run, output_of_run

    started = time.perf_counter()
    target = output if output is not None else output_of_run(find_run(path, "items"))
    with (
        exclusive_output(target, purpose="mf-dist ann"),
        open_client(workers=workers or 1, scheduler=scheduler) as client,
    ):
        result = build_ann(client, path, kind, output=output)
    console.print(
        f"ann: {result.kind} index of {result.items:,} items ({result.dim} dimensions) → {result.path} "
        f"in {time.perf_counter() - started:.1f} s",
        highlight=False,
        soft_wrap=True,
    )
