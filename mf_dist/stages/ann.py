"""ANN stage: an approximate nearest-neighbour index of the items, for services that rank items for a user.

The index answers "the items with the largest inner product with this query"
(maximum inner product search) over the items table of one run, built with
faiss (``IndexHNSWFlat``, inner product) or hnswlib (``space="ip"``); both are
HNSW graphs. For a model whose tables carry biases (``explicit``) each item is
indexed as ``[embedding, bias]`` and a user's query is ``[embedding, 1]``, so
the inner product is the predicted rating minus the user's constant
``global_mean + users.bias``: the same order as the ``recommendations`` table
(before seen items are removed). Otherwise the item is its embedding and the
query the user's embedding.

The index is built in one task on one worker (it holds all item vectors, as
the index itself does). Output, published like the other tables::

    <output>/ann/runs/<run_id>/index.faiss | index.hnsw   the index; position i = row i of items.parquet
    <output>/ann/runs/<run_id>/items.parquet             item_id, in index order (the items table's rows)
    <output>/ann/runs/<run_id>/_manifest.json            kind, dim, query rule, source items run
    <output>/ann/LATEST
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from distributed import Client
from pydantic import BaseModel

from mf_dist.errors import ConfigError
from mf_dist.storage.publish import new_run_id, publish_run, staged_run, write_manifest
from mf_dist.storage.reader import find_run, output_of_run, read_embeddings, read_manifest, run_in
from mf_dist.storage.schema import FORMAT_VERSION
from mf_dist.storage.store import join, local_copy, local_file_to_write, write_table

ANN_TABLE = "ann"
ANN_KINDS = ("faiss", "hnsw")
INDEX_FILES = {"faiss": "index.faiss", "hnsw": "index.hnsw"}
# HNSW graph degree and build/search breadth: recall above 0.95 at 10 on the tests' data.
HNSW_M = 32
EF_CONSTRUCTION = 200
EF_SEARCH = 128


class AnnResult(BaseModel):
    """What the ANN stage published."""

    run_id: str
    path: str
    kind: str
    items: int
    dim: int
    source_run_id: str


def index_vectors(vectors: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """The indexed rows: ``[embedding, bias]`` with biases, else the embeddings (float32, contiguous)."""
    rows = vectors if bias is None else np.concatenate([vectors, bias[:, None]], axis=1)
    return np.ascontiguousarray(rows, dtype=np.float32)


def query_vectors(vectors: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Users' queries for the index: ``[embedding, 1]`` when the tables carry biases, else the embeddings."""
    if bias is None:
        return np.ascontiguousarray(vectors, dtype=np.float32)
    ones = np.ones((len(vectors), 1), np.float32)
    return np.ascontiguousarray(np.concatenate([vectors, ones], axis=1), dtype=np.float32)


def build_index(kind: str, rows: np.ndarray, location: str) -> None:
    """Build the ``kind`` HNSW index of ``rows`` (inner product) and write it to ``location``.

    faiss and hnswlib write only to local files: on an object store the index
    is built in a temporary directory and uploaded as one object
    (:func:`~mf_dist.storage.store.local_file_to_write`).
    """
    with local_file_to_write(location) as path:
        if kind == "faiss":
            import faiss

            index = faiss.IndexHNSWFlat(rows.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = EF_CONSTRUCTION
            index.hnsw.efSearch = EF_SEARCH
            index.add(rows)
            faiss.write_index(index, path)
        else:
            import hnswlib

            index = hnswlib.Index(space="ip", dim=rows.shape[1])
            index.init_index(max_elements=len(rows), ef_construction=EF_CONSTRUCTION, M=HNSW_M)
            index.add_items(rows, np.arange(len(rows)))
            index.set_ef(EF_SEARCH)
            index.save_index(path)


def load_index(run_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    """(index, manifest) of a published ANN run: a faiss index or an hnswlib ``Index``, ready to search.

    ``run_dir`` may be a URL: the index is then downloaded to a temporary file
    to be loaded (both libraries read only local files), and the file removed.
    """
    manifest = read_manifest(run_dir)
    with local_copy(join(str(run_dir), INDEX_FILES[manifest["kind"]])) as path:
        if manifest["kind"] == "faiss":
            import faiss

            index = faiss.read_index(path)
            index.hnsw.efSearch = EF_SEARCH
            return index, manifest
        import hnswlib

        index = hnswlib.Index(space="ip", dim=int(manifest["dim"]))
        index.load_index(path, max_elements=int(manifest["items"]))
        index.set_ef(EF_SEARCH)
        return index, manifest


def _build(kind: str, items_run: str, partial: str) -> tuple[int, int]:
    items = read_embeddings(items_run, "items")
    rows = index_vectors(items.vectors, items.bias)
    build_index(kind, rows, join(partial, INDEX_FILES[kind]))
    ids = pa.array(items.ids.tolist(), type=pa.type_for_alias(items.manifest["id_type"]))
    write_table(pa.table({"item_id": ids}), join(partial, "items.parquet"), durable=True)
    return len(rows), rows.shape[1]


def build_ann(
    client: Client,
    source: str | Path,
    kind: str,
    *,
    source_run_id: str | None = None,
    output: str | Path | None = None,
    run_id: str | None = None,
    publish: bool = True,
) -> AnnResult:
    """Build and publish the ``ann`` index of an items run.

    ``source`` is an output directory, items table or run, or the URL of one
    (the index is then built in a temporary directory on the worker and
    uploaded, see :func:`build_index`); ``source_run_id``
    picks a run of ``source/items``. ``publish=False`` leaves ``LATEST`` to the
    caller (the flow's commit). Raises :class:`ConfigError` for an unknown kind.
    """
    if kind not in ANN_KINDS:
        raise ConfigError(f"unknown ANN index {kind!r}; choose one of {', '.join(ANN_KINDS)}")
    items_run = find_run(run_in(source, "items", source_run_id) if source_run_id else source, "items")
    manifest = read_manifest(items_run)
    output_dir = output if output is not None else output_of_run(items_run)
    run_id = run_id or new_run_id()
    table_dir = join(str(output_dir), ANN_TABLE)
    with staged_run(table_dir, run_id, "the ANN index") as partial:
        items, dim = client.submit(_build, kind, str(items_run), str(partial), pure=False).result()
        with_bias = "bias" in manifest.get("columns", [])
        ann_manifest = {
            "format_version": FORMAT_VERSION,
            "run_id": run_id,
            "table": ANN_TABLE,
            "kind": kind,
            "index_file": INDEX_FILES[kind],
            "metric": "inner_product",
            "dim": dim,
            "items": items,
            "query": "[users.embedding, 1]" if with_bias else "users.embedding",
            "indexed": "[items.embedding, items.bias]" if with_bias else "items.embedding",
            "hnsw": {"M": HNSW_M, "ef_construction": EF_CONSTRUCTION, "ef_search": EF_SEARCH},
            "source": {
                "table": "items",
                "path": str(items_run),
                "run_id": manifest["run_id"],
                "model": manifest.get("model"),
                "rank": manifest.get("rank"),
            },
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
        }
        write_manifest(partial, ann_manifest)
    if publish:
        publish_run(table_dir, run_id)
    return AnnResult(
        run_id=run_id,
        path=join(table_dir, "runs", run_id),
        kind=kind,
        items=items,
        dim=dim,
        source_run_id=manifest["run_id"],
    )
