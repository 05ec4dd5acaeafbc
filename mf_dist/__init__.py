"""mf-dist: distributed matrix factorization, Parquet ratings in, embedding tables out.

For Python users of the published tables::

    from mf_dist import read_embeddings
    items = read_embeddings("out/items")   # ids, vectors (n × rank float32), bias, manifest
"""

from mf_dist.storage.reader import Embeddings, read_embeddings

__all__ = ["Embeddings", "read_embeddings"]
