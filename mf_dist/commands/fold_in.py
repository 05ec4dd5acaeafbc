"""``mf-dist fold-in OUTPUT --input NEW_RATINGS``: publish a users run with new users folded in."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console

from mf_dist.errors import InputError
from mf_dist.runtime.cluster_settings import default_worker_count

console = Console()


def fold_in(
    path: Annotated[
        str, typer.Argument(help="Output directory (or URL) of a run with users and items tables.")
    ],
    input: Annotated[
        str,
        typer.Option("--input", help="New ratings (Parquet file or directory), in the run's input columns."),
    ],
    recommend: Annotated[
        int,
        typer.Option(
            help="Then publish the top-N unseen items of the given users (0: no); seen: their given ratings."
        ),
    ] = 0,
    workers: Annotated[
        Optional[int], typer.Option(help="Worker processes of the local Dask cluster (for --recommend).")
    ] = None,
    scheduler: Annotated[
        Optional[str], typer.Option(help="Join this Dask scheduler (for --recommend).")
    ] = None,
) -> None:
    """Compute the vectors of the users in --input against the current items (the model's own ALS
    user half-step) and publish a new users run: other users kept, those given replaced or added.

    One machine, no Dask. The new run's manifest names its base run (fold_in.base_run_id).
    """
    import pandas as pd

    from mf_dist.stages.fold_in import publish_folded_users
    from mf_dist.storage.output_lock import exclusive_output

    try:
        frame = pd.read_parquet(input)
    except (OSError, ValueError) as exc:
        raise InputError(f"{input}: cannot read the new ratings: {exc}") from exc
    with exclusive_output(path, purpose="mf-dist fold-in"):
        result = publish_folded_users(path, frame, input_description=str(input))
        if recommend:
            from mf_dist.runtime.cluster import open_client
            from mf_dist.stages.recommend import recommend_items
            from mf_dist.storage.reader import read_manifest

            config = read_manifest(result.path).get("config") or {}
            columns = {
                config.get("user_col", "user_id"): "user_id",
                config.get("item_col", "item_id"): "item_id",
                config.get("rating_col", "rating"): "rating",
            }
            seen = frame.rename(columns=columns)
            with open_client(workers=workers or default_worker_count(), scheduler=scheduler) as client:
                recommendations = recommend_items(
                    client,
                    path,
                    recommend,
                    users=seen["user_id"].unique().tolist(),
                    source_run_id=result.run_id,
                    seen_ratings=seen,
                )
    console.print(
        f"fold-in: {result.users_replaced:,} users replaced, {result.users_added:,} added "
        f"({result.unknown_items:,} ratings of unknown items skipped) on run {result.base_run_id} "
        f"→ {result.path}",
        highlight=False,
        soft_wrap=True,
    )
    if recommend:
        console.print(
            f"recommendations: {recommendations.users:,} users × top {recommendations.n} "
            f"({recommendations.rows:,} rows) → {recommendations.path}",
            highlight=False,
            soft_wrap=True,
        )
