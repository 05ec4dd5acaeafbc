"""``mf-dist inspect PATH`` and ``mf-dist similar PATH ITEM_ID``: published runs, readably."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import typer
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from mf_dist.errors import NotFoundError, OutputError
from mf_dist.storage.filesystems import is_remote, storage_errors
from mf_dist.storage.reader import (
    LATEST_FILE,
    MANIFEST_FILE,
    find_run,
    output_of_run,
    read_manifest,
    run_in,
)
from mf_dist.storage.store import exists, join, list_names, read_bytes, read_table, size
from mf_dist.terminal.text_chart import text_chart

console = Console()

# Tables in the order a person reads them; others follow by name.
TABLE_ORDER = {"items": 0, "users": 1, "neighbors": 2}

# A run is a Path for a local path, its URL (a string) for an object store: mf_dist.storage.reader.find_run.
Run = Path | str


@contextlib.contextmanager
def store_errors(location: str | Path) -> Iterator[None]:
    """One-line errors for an object store's credential, permission and bucket failures at ``location``."""
    if is_remote(location):
        with storage_errors(str(location), OutputError):
            yield
    else:
        yield


def _has(location: str | Path, *parts: str) -> bool:
    return exists(join(str(location), *parts))


def runs_to_inspect(path: str | Path) -> list[Run]:
    """The runs ``path`` designates: one run, one table's current run, or every table's (local or URL)."""
    if _has(path, MANIFEST_FILE) or _has(path, LATEST_FILE):
        return [find_run(path)]
    tables = sorted(
        (name for name in list_names(path) if _has(path, name, LATEST_FILE)),
        key=lambda name: (TABLE_ORDER.get(name, len(TABLE_ORDER)), name),
    )
    if not tables:
        return [find_run(path)]  # raises the error that says what was expected
    return [find_run(join(str(path), table)) for table in tables]


def _table_and_id(run: Run) -> tuple[str, str] | None:
    """(table location, run id) of a run under ``<table>/runs/``; None for a run directory elsewhere."""
    parts = str(run).rstrip("/").rsplit("/", 2)
    if len(parts) < 3 or parts[1] != "runs":
        return None
    return parts[0], parts[2]


def is_current(run: Run) -> bool:
    """Whether its table's ``LATEST`` names ``run``."""
    where = _table_and_id(run)
    if where is None:
        return False
    try:
        return read_bytes(join(where[0], LATEST_FILE)).decode().strip() == where[1]
    except OSError:
        return False


def _output_above(run: Run, path: str | Path) -> str | Path:
    """The output a run belongs to, or ``path`` itself for a run directory that is not under ``runs/``."""
    return output_of_run(run) if _table_and_id(run) is not None else path


def _size(run_dir: Run, files: list[dict[str, Any]]) -> str:
    total: float = 0
    for entry in files:
        with contextlib.suppress(FileNotFoundError):
            total += size(join(str(run_dir), entry["name"]))
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


def describe_run(run_dir: Run, *, current: bool) -> Panel:
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
    with store_errors(path):
        for run in runs_to_inspect(path):
            console.print(describe_run(run, current=is_current(run)))


def neighbors_run_dir(path: str | Path) -> Run:
    """The neighbours run for ``path``: an output directory, the neighbors table or a run of it.

    A path to the ``items`` table (or one of its runs) finds the neighbors
    table beside it.
    """
    if _has(path, "neighbors", LATEST_FILE):
        return find_run(join(str(path), "neighbors"))
    run_dir = find_run(path)
    if read_manifest(run_dir).get("table") == "neighbors":
        return run_dir
    output = _output_above(run_dir, path)
    if _has(output, "neighbors", LATEST_FILE):
        return find_run(join(str(output), "neighbors"))
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


def output_root(path: str | Path) -> str | Path:
    """The output directory of ``path``: itself, or the output above a table or run directory."""
    if any(_has(path, table, LATEST_FILE) for table in ("items", "neighbors", "ann")):
        return path
    return _output_above(find_run(path), path)


def current_ann_run(output: str | Path) -> Run | None:
    """The current ANN run of ``output`` if it indexes the current ``items`` run (a stale one is ignored)."""
    if not _has(output, "ann", LATEST_FILE) or not _has(output, "items", LATEST_FILE):
        return None
    run_dir = find_run(join(str(output), "ann"))
    items_run = str(find_run(join(str(output), "items"))).rstrip("/").rsplit("/", 1)[-1]
    return run_dir if read_manifest(run_dir)["source"]["run_id"] == items_run else None


def _position(ids: list[Any], wanted: object, where: Path | str) -> int:
    try:
        return ids.index(wanted)
    except ValueError:
        raise NotFoundError(f"item {str(wanted)!r} is not in {where} ({len(ids):,} items)") from None


def similar_by_ann(run_dir: Run, wanted: object, top: int) -> SimilarItems:
    """The index's nearest items by inner product with the item's own embedding (approximate).

    With biases the index holds ``[embedding, bias]``; the query is
    ``[embedding, 0]``, so the score is the plain dot product of the embeddings.
    On an object store the index is downloaded to a temporary file to be loaded.
    """
    from mf_dist.stages.ann import load_index
    from mf_dist.storage.reader import read_embeddings

    index, manifest = load_index(run_dir)
    # The indexed items run, beside the index (the manifest's absolute path may have moved).
    items = read_embeddings(run_in(output_of_run(run_dir), "items", manifest["source"]["run_id"]), "items")
    ids = read_table(join(str(run_dir), "items.parquet"))["item_id"].to_pylist()
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


def similar_by_neighbors(run_dir: Run, wanted: object, top: int) -> SimilarItems:
    """The item's rows of the neighbors table."""
    manifest = read_manifest(run_dir)
    try:
        rows = pa.concat_tables(
            read_table(join(str(run_dir), entry["name"]), filters=[("item_id", "==", wanted)])
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


def similar_by_exact_cosine(output: str | Path, wanted: object, top: int) -> SimilarItems:
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


def _ann_searchable(run_dir: Run) -> bool:
    """Whether the index's library (the ``ann`` extra) is installed here."""
    import importlib.util

    kind = read_manifest(run_dir)["kind"]
    return importlib.util.find_spec("faiss" if kind == "faiss" else "hnswlib") is not None


def given_neighbors_run(path: str | Path) -> Run | None:
    """The neighbors run ``path`` names when it is the neighbors table or one of its runs, else None."""
    if not (_has(path, MANIFEST_FILE) or _has(path, LATEST_FILE)):
        return None
    run_dir = find_run(path)
    return run_dir if read_manifest(run_dir).get("table") == "neighbors" else None


def find_similar(path: str | Path, item_id: str, top: int, source: SimilarSource = "auto") -> SimilarItems:
    """An item's most similar items from the best source there is.

    ``auto``: the ANN index when the output has one of its current ``items``
    run (and its library is installed), else the neighbors table, else exact
    cosine over the items table. ``path`` may also name the neighbors table
    or one of its runs, which is then what answers. Any of them may be a URL.
    """
    given = given_neighbors_run(path)
    if given is not None and source in ("auto", "neighbors"):
        return similar_by_neighbors(given, _wanted(given, item_id), top)
    output = output_root(path)
    if source in ("auto", "ann"):
        ann_run = current_ann_run(output)
        if ann_run is not None and (source == "ann" or _ann_searchable(ann_run)):
            indexed = run_in(output, "items", read_manifest(ann_run)["source"]["run_id"])
            return similar_by_ann(ann_run, _wanted(indexed, item_id), top)
        if source == "ann":
            raise NotFoundError(
                f"no ANN index of the current items run in {output}; build it with: mf-dist ann {output}"
            )
    if source == "neighbors" or (source == "auto" and _has(output, "neighbors", LATEST_FILE)):
        run_dir = neighbors_run_dir(output)
        return similar_by_neighbors(run_dir, _wanted(run_dir, item_id), top)
    items_run = find_run(join(str(output), "items") if _has(output, "items") else output, "items")
    return similar_by_exact_cosine(output, _wanted(items_run, item_id), top)


def _wanted(run_dir: Run, item_id: str) -> object:
    """``item_id`` parsed as the id type of ``run_dir`` (an items or neighbors run)."""
    manifest = read_manifest(run_dir)
    return parse_item_id(item_id, pa.type_for_alias(manifest["id_type"]))


def similar(
    path: Annotated[
        str,
        typer.Argument(help="Output directory, or the neighbors table or one of its runs; or its URL."),
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
    with store_errors(path):
        found = find_similar(path, item_id, top, source)
    console.print(f"items most similar to [bold]{item_id}[/] by {found.how}", highlight=False)
    table = Table()
    table.add_column("rank", justify="right")
    table.add_column("item_id")
    table.add_column("score", justify="right")
    for rank, (neighbor, score) in enumerate(zip(found.ids, found.scores, strict=True), start=1):
        table.add_row(str(rank), str(neighbor), f"{score:.4f}")
    console.print(table)
