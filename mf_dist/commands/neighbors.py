"""``mf-dist neighbors PATH``: compute and publish the neighbors table of an items table."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer
from rich.console import Console

from mf_dist.commands.options import DeviceOption, QuietOption, SchedulerOption, WorkersOption
from mf_dist.runtime.cluster_settings import default_worker_count
from mf_dist.settings import NeighborsMetric
from mf_dist.terminal.progress import count_progress

console = Console()


def neighbors(
    path: Annotated[
        str,
        typer.Argument(help="Output directory, items table (e.g. out/items) or one of its runs; or its URL."),
    ],
    k: Annotated[int, typer.Option("--k", "-k", help="Neighbours per item.")] = 10,
    metric: Annotated[NeighborsMetric, typer.Option(help="Similarity: cosine or dot product.")] = "cosine",
    output: Annotated[
        Optional[str], typer.Option(help="Where neighbors/ goes (default: beside the items table).")
    ] = None,
    block_size: Annotated[int, typer.Option(help="Items per block (scores per task: block²).")] = 4096,
    workers: WorkersOption = None,
    scheduler: SchedulerOption = None,
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
) -> None:
    """For every item, its k most similar items (by cosine or dot product), as a published table."""
    # Imported here: torch and Dask take seconds to import, and `mf-dist --help` should not wait.
    from mf_dist.runtime.cluster import open_client
    from mf_dist.stages.neighbors import item_neighbors
    from mf_dist.storage.output_lock import exclusive_output
    from mf_dist.storage.reader import find_run, output_of_run

    started = time.perf_counter()
    # A pipeline run starting on this output would otherwise take our
    # half-written table for debris of a killed run (see mf_dist.storage.output_lock).
    target = output if output is not None else output_of_run(find_run(path, "items"))
    with (
        exclusive_output(target, purpose="mf-dist neighbors"),
        open_client(workers=workers or default_worker_count(), scheduler=scheduler) as client,
        count_progress(console, "neighbours", "blocks", quiet=quiet) as on_block,
    ):
        result = item_neighbors(
            client,
            path,
            k,
            metric,
            output=output,
            block_size=block_size,
            device=device,
            on_block=on_block,
        )
    items = result.rows // result.k
    console.print(
        f"neighbors: {items:,} items × {result.k} ({result.metric}, {result.device}) → {result.path} "
        f"in {time.perf_counter() - started:.1f} s",
        highlight=False,
        soft_wrap=True,
    )
