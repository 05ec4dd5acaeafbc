"""``mf-dist inspect PATH`` and ``mf-dist similar PATH ITEM_ID``: published runs, readably."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import typer
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from mf_dist.errors import NotFoundError, OutputError
from mf_dist.storage.filesystems import is_remote, join, local_path, resolve, storage_errors
from mf_dist.storage.reader import (
    LATEST_FILE,
    MANIFEST_FILE,
    read_manifest,
    resolve_remote_run,
    resolve_run_dir,
)
from mf_dist.terminal.text_chart import text_chart

console = Console()

# Tables in the order a person reads them; others follow by name.
TABLE_ORDER = {"items": 0, "users": 1, "neighbors": 2}


def runs_to_inspect(path: Path) -> list[Path]:
    """The run directories ``path`` designates: one run, one table's current run, or every table's."""
    if (path / MANIFEST_FILE).is_file() or (path / LATEST_FILE).is_file():
        return [resolve_run_dir(path)]
    tables = sorted(
        (child for child in path.iterdir() if (child / LATEST_FILE).is_file()) if path.is_dir() else [],
        key=lambda child: (TABLE_ORDER.get(child.name, len(TABLE_ORDER)), child.name),
    )
    if not tables:
        return [resolve_run_dir(path)]  # raises the error that says what was expected
    return [resolve_run_dir(table) for table in tables]


def remote_runs_to_inspect(url: str) -> list[str]:
    """:func:`runs_to_inspect` for a URL (``s3://bucket/out``): the URLs of the runs it designates."""
    filesystem, root = resolve(url)
    root = root.rstrip("/")
    with storage_errors(url, OutputError):
        if filesystem.isfile(join(root, MANIFEST_FILE)) or filesystem.isfile(join(root, LATEST_FILE)):
            return [resolve_remote_run(url)]
        children = filesystem.ls(root, detail=False) if filesystem.isdir(root) else []
        tables = sorted(
            (
                child.rstrip("/").rsplit("/", 1)[-1]
                for child in children
                if filesystem.isfile(join(child, LATEST_FILE))
            ),
            key=lambda name: (TABLE_ORDER.get(name, len(TABLE_ORDER)), name),
        )
    if not tables:
        return [resolve_remote_run(url)]  # raises the error that says what was expected
    return [resolve_remote_run(join(url, table)) for table in tables]


def _size(run_dir: Path | str, files: list[dict[str, Any]]) -> str:
    if is_remote(run_dir):
        filesystem, root = resolve(str(run_dir))
        sizes = filesystem.ls(root, detail=True)
        by_name = {info["name"].rstrip("/").rsplit("/", 1)[-1]: info.get("size") or 0 for info in sizes}
        total = sum(by_name.get(entry["name"], 0) for entry in files)
    else:
        run_dir = Path(run_dir)
        total = sum(
            (run_dir / entry["name"]).stat().st_size for entry in files if (run_dir / entry["name"]).exists()
        )
    for unit in ("B", "KiB", "MiB", "GiB"):
        if total < 1024 or unit == "GiB":
            return f"{total:.0f} {unit}" if unit == "B" else f"{total:.1f} {unit}"
        total /= 1024
    raise AssertionError("unreachable")


def _metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())


def training_seconds(history: list[dict[str, Any]]) -> float:
    """The training time of a run: ``loss_history[].seconds`` counts from the start of training.

    Each record's ``seconds`` is cumulative (docs/tables.md), so the run took
    as long as its last record says; summing them would count every epoch
    again for each later one.
    """
    return max((float(record.get("seconds", 0.0)) for record in history), default=0.0)


def describe_run(run_dir: Path | str, *, current: bool) -> Panel:
    """A panel summarising one run's manifest: what, how big, how well, and its loss curve."""
    manifest = read_manifest(run_dir)
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    files = manifest.get("files", [])
    facts.add_row("path", str(run_dir))
    facts.add_row("created", str(manifest.get("created_at", "?")))
    facts.add_row("format", f"version {manifest['format_version']}")
    facts.add_row(
        "rows", f"{manifest.get('row_count', 0):,} in {len(files)} file(s), {_size(run_dir, files)}"
    )
    if manifest.get("table") == "neighbors":
        source = manifest.get("source", {})
        facts.add_row("neighbours", f"top {manifest.get('k')} by {manifest.get('metric')} per item")
        facts.add_row(
            "from",
            f"items run {source.get('run_id')} ({source.get('model')}, rank {source.get('rank')})",
        )
        facts.add_row("device", str(manifest.get("device", "?")))
        body: Any = facts
    else:
        config = manifest.get("config", {})
        model = f"{manifest.get('model')}, rank {manifest.get('rank')}"
        if manifest.get("solver") or config.get("solver"):
            model += f", solver {manifest.get('solver') or config.get('solver')}"
        facts.add_row("model", model)
        facts.add_row("ids", f"{manifest.get('id_column')} ({manifest.get('id_type')})")
        history = manifest.get("loss_history", [])
        if history:
            seconds = training_seconds(history)
            facts.add_row(
                "training",
                f"{len(history)} epochs ({history[0]['epoch']}..{history[-1]['epoch']}), {seconds:.1f} s",
            )
        metrics = dict(manifest.get("metrics", {}))
        final_loss = metrics.pop("final_loss", None)
        if final_loss is not None:
            facts.add_row("final loss", f"{final_loss:.6g}" + (f"  ({_metrics(metrics)})" if metrics else ""))
        if "global_mean" in manifest:
            facts.add_row("global mean", f"{manifest['global_mean']:.6g}")
        if "prediction_rule" in manifest:
            facts.add_row("prediction", str(manifest["prediction_rule"]))
        if "input_rows" in manifest:
            fingerprint = str(manifest.get("input_fingerprint"))[:12]
            facts.add_row("input", f"{manifest['input_rows']:,} ratings, fingerprint {fingerprint}")
        facts.add_row("device", str(manifest.get("device", "?")))
        if manifest.get("loss_curve"):
            facts.add_row("loss curve", join(str(run_dir), manifest["loss_curve"]))
        chart = text_chart([r["epoch"] for r in history], [r["loss"] for r in history])
        body = Group(facts, Text(""), Text("\n".join(chart))) if chart else facts
    title = f"{manifest.get('table', '?')} · run {manifest.get('run_id', str(run_dir).rsplit('/', 1)[-1])}"
    return Panel(body, title=title + (" (current)" if current else ""), title_align="left", expand=False)


def inspect_run(
    path: Annotated[
        str, typer.Argument(help="Output directory, table directory (e.g. out/items) or run; or its URL.")
    ],
) -> None:
    """Summarise published runs: model, rank, rows, metrics and the loss curve."""
    if is_remote(path):
        for run_url in remote_runs_to_inspect(path):
            table_url, run_id = run_url.rsplit("/runs/", 1)
            filesystem, table_path = resolve(table_url)
            with storage_errors(table_url, OutputError):
                latest = filesystem.cat_file(join(table_path, LATEST_FILE)).decode().strip()
            console.print(describe_run(run_url, current=latest == run_id))
        return
    for run_dir in runs_to_inspect(Path(local_path(path))):
        latest = run_dir.parent.parent / LATEST_FILE
        current = latest.is_file() and latest.read_text().strip() == run_dir.name
        console.print(describe_run(run_dir, current=current))


def neighbors_run_dir(path: Path) -> Path:
    """The neighbours run for ``path``: an output directory, the neighbors table or a run of it.

    A path to the ``items`` table (or one of its runs) finds the neighbors
    table beside it.
    """
    if (path / "neighbors" / LATEST_FILE).is_file():
        return resolve_run_dir(path / "neighbors")
    run_dir = resolve_run_dir(path)
    if read_manifest(run_dir).get("table") == "neighbors":
        return run_dir
    output = run_dir.parents[2] if len(run_dir.parents) >= 3 else path
    if (output / "neighbors" / LATEST_FILE).is_file():
        return resolve_run_dir(output / "neighbors")
    raise NotFoundError(f"no neighbors table for {path}; compute it with: mf-dist neighbors {output}")


def parse_item_id(text: str, id_type: pa.DataType) -> object:
    if pa.types.is_integer(id_type):
        try:
            return int(text)
        except ValueError:
            raise NotFoundError(
                f"item ids of this table are integers ({id_type}); {text!r} is not one"
            ) from None
    return text


SimilarSource = Literal["auto", "ann", "neighbors", "exact"]


@dataclass(frozen=True)
class SimilarItems:
    """An item's most similar items, best first, and where the answer came from (for the heading)."""

    ids: list[Any]
    scores: list[float]
    how: str


def output_root(path: Path) -> Path:
    """The output directory of ``path``: itself, or the output above a table or run directory."""
    if any((path / table / LATEST_FILE).is_file() for table in ("items", "neighbors", "ann")):
        return path
    run_dir = resolve_run_dir(path)
    return run_dir.parents[2] if len(run_dir.parents) >= 3 else path


def current_ann_run(output: Path) -> Path | None:
    """The current ANN run of ``output`` if it indexes the current ``items`` run (a stale one is ignored)."""
    if not (output / "ann" / LATEST_FILE).is_file() or not (output / "items" / LATEST_FILE).is_file():
        return None
    run_dir = resolve_run_dir(output / "ann")
    items_run = resolve_run_dir(output / "items").name
    return run_dir if read_manifest(run_dir)["source"]["run_id"] == items_run else None


def _position(ids: list[Any], wanted: object, where: Path | str) -> int:
    try:
        return ids.index(wanted)
    except ValueError:
        raise NotFoundError(f"item {str(wanted)!r} is not in {where} ({len(ids):,} items)") from None


def similar_by_ann(run_dir: Path, wanted: object, top: int) -> SimilarItems:
    """The index's nearest items by inner product with the item's own embedding (approximate).

    With biases the index holds ``[embedding, bias]``; the query is
    ``[embedding, 0]``, so the score is the plain dot product of the embeddings.
    """
    from mf_dist.stages.ann import load_index
    from mf_dist.storage.reader import read_embeddings

    index, manifest = load_index(run_dir)
    # The indexed items run, beside the index (the manifest's absolute path may have moved).
    items = read_embeddings(run_dir.parents[2] / "items" / "runs" / manifest["source"]["run_id"], "items")
    ids = pq.read_table(run_dir / "items.parquet")["item_id"].to_pylist()
    position = _position(ids, wanted, run_dir)
    query = items.vectors[position]
    if items.bias is not None:
        query = np.concatenate([query, np.zeros(1, np.float32)])
    query = np.ascontiguousarray(query[None, :], dtype=np.float32)
    wanted_count = min(top + 1, len(ids))
    if manifest["kind"] == "faiss":
        scores, found = index.search(query, wanted_count)
        pairs = list(zip(found[0].tolist(), scores[0].tolist(), strict=True))
    else:
        found, distances = index.knn_query(query, k=wanted_count)
        # hnswlib's "ip" space returns 1 − inner product.
        pairs = [(int(row), 1.0 - float(d)) for row, d in zip(found[0], distances[0], strict=True)]
    kept = [(row, score) for row, score in pairs if row != position and row >= 0][:top]
    return SimilarItems(
        [ids[row] for row, _ in kept],
        [score for _, score in kept],
        f"inner product, approximate (ann run {manifest['run_id']}, {manifest['kind']})",
    )


def similar_by_neighbors(run_dir: Path, wanted: object, top: int) -> SimilarItems:
    """The item's rows of the neighbors table."""
    manifest = read_manifest(run_dir)
    try:
        rows = pa.concat_tables(
            pq.read_table(run_dir / entry["name"], filters=[("item_id", "==", wanted)])
            for entry in manifest["files"]
        ).sort_by("rank")
    except (OSError, pa.ArrowInvalid) as exc:
        raise OutputError(f"{run_dir}: cannot read the neighbors table: {exc}") from exc
    if rows.num_rows == 0:
        raise NotFoundError(f"item {str(wanted)!r} is not in {run_dir} ({manifest['row_count']:,} rows)")
    return SimilarItems(
        rows["neighbor_id"].to_pylist()[:top],
        rows["score"].to_pylist()[:top],
        f"{manifest['metric']} (neighbors run {manifest['run_id']})",
    )


def similar_by_exact_cosine(output: Path, wanted: object, top: int) -> SimilarItems:
    """Cosine against every item of the current ``items`` run (a zero vector scores 0); ties by row."""
    from mf_dist.storage.reader import read_embeddings

    items = read_embeddings(output, "items")
    ids = items.ids.tolist()
    position = _position(ids, wanted, items.path)
    vectors = items.vectors.astype(np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    normalised = vectors / np.where(norms > 0, norms, 1.0)[:, None]
    scores = normalised @ normalised[position]
    scores[position] = -np.inf
    order = np.lexsort((np.arange(len(ids)), -scores))[: min(top, len(ids) - 1)]
    return SimilarItems(
        [ids[row] for row in order],
        scores[order].tolist(),
        f"cosine, exact over the items (items run {items.manifest['run_id']})",
    )


def _ann_searchable(run_dir: Path) -> bool:
    """Whether the index's library (the ``ann`` extra) is installed here."""
    import importlib.util

    kind = read_manifest(run_dir)["kind"]
    return importlib.util.find_spec("faiss" if kind == "faiss" else "hnswlib") is not None


def given_neighbors_run(path: Path) -> Path | None:
    """The neighbors run ``path`` names when it is the neighbors table or one of its runs, else None."""
    if not ((path / MANIFEST_FILE).is_file() or (path / LATEST_FILE).is_file()):
        return None
    run_dir = resolve_run_dir(path)
    return run_dir if read_manifest(run_dir).get("table") == "neighbors" else None


def find_similar(path: Path, item_id: str, top: int, source: SimilarSource = "auto") -> SimilarItems:
    """An item's most similar items from the best source there is.

    ``auto``: the ANN index when the output has one of its current ``items``
    run (and its library is installed), else the neighbors table, else exact
    cosine over the items table. ``path`` may also name the neighbors table
    or one of its runs, which is then what answers.
    """
    given = given_neighbors_run(path)
    if given is not None and source in ("auto", "neighbors"):
        return similar_by_neighbors(given, _wanted(given, item_id), top)
    output = output_root(path)
    if source in ("auto", "ann"):
        ann_run = current_ann_run(output)
        if ann_run is not None and (source == "ann" or _ann_searchable(ann_run)):
            indexed = output / "items" / "runs" / read_manifest(ann_run)["source"]["run_id"]
            return similar_by_ann(ann_run, _wanted(indexed, item_id), top)
        if source == "ann":
            raise NotFoundError(
                f"no ANN index of the current items run in {output}; build it with: mf-dist ann {output}"
            )
    if source == "neighbors" or (source == "auto" and (output / "neighbors" / LATEST_FILE).is_file()):
        run_dir = neighbors_run_dir(output)
        return similar_by_neighbors(run_dir, _wanted(run_dir, item_id), top)
    items_run = resolve_run_dir(output / "items" if (output / "items").is_dir() else output, "items")
    return similar_by_exact_cosine(output, _wanted(items_run, item_id), top)


def _wanted(run_dir: Path, item_id: str) -> object:
    """``item_id`` parsed as the id type of ``run_dir`` (an items or neighbors run)."""
    manifest = read_manifest(run_dir)
    return parse_item_id(item_id, pa.type_for_alias(manifest["id_type"]))


def similar(
    path: Annotated[
        Path, typer.Argument(help="Output directory, or the neighbors table or one of its runs.")
    ],
    item_id: Annotated[str, typer.Argument(help="The item's original id.")],
    top: Annotated[int, typer.Option(help="Show at most this many neighbours.")] = 20,
    source: Annotated[
        SimilarSource,
        typer.Option(
            help="auto: the ANN index if there is one, else the neighbors table, else exact cosine "
            "over the items; or one of ann, neighbors, exact."
        ),
    ] = "auto",
) -> None:
    """Print an item's most similar items: from the ANN index, the neighbors table or the items themselves."""
    found = find_similar(path, item_id, top, source)
    console.print(f"items most similar to [bold]{item_id}[/] by {found.how}", highlight=False)
    table = Table()
    table.add_column("rank", justify="right")
    table.add_column("item_id")
    table.add_column("score", justify="right")
    for rank, (neighbor, score) in enumerate(zip(found.ids, found.scores, strict=True), start=1):
        table.add_row(str(rank), str(neighbor), f"{score:.4f}")
    console.print(table)
