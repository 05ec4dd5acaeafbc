"""mf-dist: distributed matrix factorization, Parquet ratings in, embedding tables out.

For Python users of the published tables::

    from mf_dist import read_embeddings
    items = read_embeddings("out/items")   # ids, vectors (n × rank float32), bias, manifest

For services, vectors of new users against the published items (one
machine, no Dask; :mod:`mf_dist.stages.fold_in`)::

    from mf_dist import fold_in
    users = fold_in("out/items", ratings_frame)   # ids, vectors, bias, unknown_items
"""

from typing import Any

from mf_dist.storage.reader import Embeddings, read_embeddings

__all__ = ["Embeddings", "FoldedUsers", "fold_in", "read_embeddings"]

# Loaded on first use: importing any mf_dist module imports this package first,
# and the engine's modules must not pull in a stage (tests/architecture).
_FROM_FOLD_IN = ("FoldedUsers", "fold_in")


def __getattr__(name: str) -> Any:
    if name in _FROM_FOLD_IN:
        from mf_dist.stages import fold_in as module

        return getattr(module, name)
    raise AttributeError(f"module 'mf_dist' has no attribute {name!r}")
