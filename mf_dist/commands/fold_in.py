"""``mf-dist fold-in OUTPUT --input NEW_RATINGS``: publish a users run with new users folded in."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mf_dist.errors import InputError

console = Console()


def fold_in(
    path: Annotated[Path, typer.Argument(help="Output directory of a run with users and items tables.")],
    input: Annotated[
        Path,
        typer.Option("--input", help="New ratings (Parquet file or directory), in the run's input columns."),
    ],
) -> None:
    """Compute the vectors of the users in --input against the current items (the model's own ALS
    user half-step) and publish a new users run: other users kept, those given replaced or added.

    One machine, no Dask. The new run's manifest names its base run (fold_in.base_run_id).
    """
    import pandas as pd

    from mf_dist.stages.fold_in import publish_folded_users
    from mf_dist.storage.output_lock import exclusive_directory

    try:
        frame = pd.read_parquet(input)
    except (OSError, ValueError) as exc:
        raise InputError(f"{input}: cannot read the new ratings: {exc}") from exc
    with exclusive_directory(path, purpose="mf-dist fold-in"):
        result = publish_folded_users(path, frame, input_description=str(input))
    console.print(
        f"fold-in: {result.users_replaced:,} users replaced, {result.users_added:,} added "
        f"({result.unknown_items:,} ratings of unknown items skipped) on run {result.base_run_id} "
        f"→ {result.path}",
        highlight=False,
        soft_wrap=True,
    )
