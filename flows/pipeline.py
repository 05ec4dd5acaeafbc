"""Prefect entrypoint file for ``flows/pipeline.py:factorization_pipeline``.

The flow itself lives in :mod:`mf_dist.flows.pipeline`, installed with the
package (deploy/prefect.yaml names that module, so nothing needs pulling where
mf-dist is installed); this file lets Prefect's path-style entrypoints
(``prefect deploy flows/pipeline.py:factorization_pipeline`` from a checkout)
find the same flow object.
"""

from mf_dist.flows.pipeline import factorization_pipeline

__all__ = ["factorization_pipeline"]
