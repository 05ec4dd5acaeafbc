"""``mf-dist recommend OUTPUT -n N``: compute and publish the recommendations table of a published run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console

from mf_dist.commands.options import DeviceOption, QuietOption, SchedulerOption, WorkersOption
from mf_dist.errors import ConfigError, InputError
from mf_dist.runtime.cluster_settings import default_worker_count
from mf_dist.terminal.progress import count_progress

if TYPE_CHECKING:
    import pandas as pd

console = Console()


def read_user_ids(path: Path) -> list[Any]:
    """User ids from a Parquet file (its ``user_id`` column, else its only column) or a text file, one a line.

    Text ids that are all integers are read as integers (the users table's
    ids are int64 or string).
    """
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        column = "user_id" if "user_id" in table.column_names else table.column_names[0]
        if table.num_columns != 1 and column != "user_id":
            raise ConfigError(f"{path}: no user_id column (columns: {', '.join(table.column_names)})")
        return table[column].to_pylist()
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the user ids: {exc}") from exc
    try:
        return [int(line) for line in lines]
    except ValueError:
        return lines


def read_training_ratings(path: str | Path, config: dict[str, Any], like_rule: bool) -> pd.DataFrame:
    """The run's training ratings from ``path`` (Parquet file, directory or glob) as ``user_id``,
    ``item_id`` and (when present) ``rating`` columns, read by the run config's column names.

    Only the columns the seen filter needs are read. Raises :class:`InputError`
    naming the file and the column when one is missing.
    """
    import pandas as pd

    from mf_dist.storage.input_files import list_input_files
    from mf_dist.storage.store import read_schema, read_table

    names = {
        config.get("user_col") or "user_id": "user_id",
        config.get("item_col") or "item_id": "item_id",
    }
    rating = config.get("rating_col") or "rating"
    frames = []
    for file in list_input_files(str(path)):
        try:
            present = read_schema(file).names
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read the training ratings: {exc}", file=file) from exc
        for column in names:
            if column not in present:
                raise InputError(
                    f"no such column among {', '.join(present)} (the run's input columns)",
                    file=file,
                    column=column,
                )
        wanted = [*names, *([rating] if like_rule and rating in present else [])]
        frames.append(read_table(file, columns=wanted).to_pandas())
    return pd.concat(frames, ignore_index=True).rename(columns={**names, rating: "rating"})


def recommend(
    path: Annotated[
        str, typer.Argument(help="Output directory (or URL) of a run with users and items tables.")
    ],
    n: Annotated[int, typer.Option("--n", "-n", help="Items per user.")] = 10,
    users: Annotated[
        Optional[Path],
        typer.Option(help="Only these users: a text file of ids, one a line, or Parquet with user_id."),
    ] = None,
    keep_seen: Annotated[
        bool, typer.Option("--keep-seen", help="Keep the items users already rated (liked) in training.")
    ] = False,
    work_dir: Annotated[
        Optional[str],
        typer.Option(help="The run's work directory, where seen items are read (default: the run's own)."),
    ] = None,
    input: Annotated[
        Optional[str],
        typer.Option(
            "--input",
            help="Read seen items from these training ratings (Parquet file, directory or glob, the "
            "run's input columns) instead of the work directory.",
        ),
    ] = None,
    run: Annotated[Optional[str], typer.Option(help="Run id (default: the current users run).")] = None,
    output: Annotated[
        Optional[str], typer.Option(help="Where recommendations/ goes (default: PATH).")
    ] = None,
    block_size: Annotated[int, typer.Option(help="Users or items per block.")] = 4096,
    workers: WorkersOption = None,
    scheduler: SchedulerOption = None,
    device: DeviceOption = "auto",
    quiet: QuietOption = False,
) -> None:
    """Each user's top-N items by the model's prediction, items seen in training left out, as a table.

    Seen items come from the run's work directory (its ingest output): the
    run's own (config work_dir, else <output>/_work) unless --work-dir says
    otherwise; where it is gone, give the training ratings (--input) or --keep-seen.
    """
    if input is not None and (work_dir is not None or keep_seen):
        raise ConfigError("--input gives the seen items: leave out --work-dir and --keep-seen")
    from mf_dist.registry import model_spec
    from mf_dist.runtime.cluster import open_client
    from mf_dist.stages.recommend import recommend_items
    from mf_dist.storage.output_lock import exclusive_output
    from mf_dist.storage.reader import find_run, output_of_run, read_manifest, run_in
    from mf_dist.storage.store import join

    started = time.perf_counter()
    users_run = find_run(run_in(path, "users", run) if run else path, "users")
    users_manifest = read_manifest(users_run)
    config = users_manifest.get("config") or {}
    seen_ratings = None
    if input is not None:
        like_rule = model_spec(users_manifest["model"]).seen_items == "liked"
        seen_ratings = read_training_ratings(input, config, like_rule)
    elif work_dir is None and not keep_seen:
        work_dir = config.get("work_dir") or join(str(output_of_run(users_run)), "_work")
    wanted = read_user_ids(users) if users is not None else None
    target = output if output is not None else path
    with (
        exclusive_output(target, purpose="mf-dist recommend"),
        open_client(workers=workers or default_worker_count(), scheduler=scheduler) as client,
        count_progress(console, "recommendations", "blocks", quiet=quiet) as on_block,
    ):
        result = recommend_items(
            client,
            path,
            n,
            work_dir=work_dir,
            keep_seen=keep_seen,
            users=wanted,
            output=output,
            source_run_id=run,
            block_size=block_size,
            device=device,
            on_block=on_block,
            seen_ratings=seen_ratings,
        )
    console.print(
        f"recommendations: {result.users:,} users × top {result.n} "
        f"({result.rows:,} rows, seen {result.seen}, "
        f"{result.users_short:,} users short of {result.n}, {result.device}) → {result.path} "
        f"in {time.perf_counter() - started:.1f} s",
        highlight=False,
        soft_wrap=True,
    )
