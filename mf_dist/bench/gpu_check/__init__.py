"""The GPU check (``deploy/gpu/check.sh``): install from the carried wheelhouse, CUDA tests, CPU/CUDA
parity of every model × solver, a memory-capped run, benchmark suites on CUDA beside their CPU
references, all within a wall-clock budget, written as one JSON and one Markdown table.

The driver (``python -m mf_dist.bench.gpu_check``) runs under the machine's own Python, before
anything is installed: it and :mod:`~mf_dist.bench.gpu_check.plan`,
:mod:`~mf_dist.bench.gpu_check.report`, :mod:`~mf_dist.bench.gpu_check.wheelhouse` and
:mod:`~mf_dist.bench.gpu_check.install` need the standard library only (plus numpy and pyarrow,
which ``import mf_dist`` loads and the image has). Each step after the install is a child process
of the new environment's Python (:mod:`~mf_dist.bench.gpu_check.steps`). deploy/gpu/README.md
says how to run it.
"""
