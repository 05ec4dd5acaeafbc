"""``mf-dist bench``: our stages against a reference implementation, in one command.

Each suite generates its data with a fixed seed (:mod:`mf_dist.bench.data`),
then runs our implementation (real stage functions on a real local Dask
cluster) and the reference one after the other, each in its own child
process so that the peak memory of each side is its own
(:mod:`mf_dist.bench.measure`). The results are a :class:`~mf_dist.bench.results.SuiteResult`
per suite, printed as a table and optionally written as JSON.
"""
