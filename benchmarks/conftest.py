"""Shared pieces of the pytest-benchmark suites (test_bench_*.py).

Run explicitly from the repository root (``testpaths`` in pyproject.toml only covers
python_tests)::

    python -m pytest benchmarks -q --benchmark-columns=median,iqr,rounds \
        --benchmark-sort=name --benchmark-json=bench.json
    python -m benchmarks.summarize bench.json

Every benchmark is parametrized by device (``common.params.DEVICES``); the ``cuda`` parameter is
skipped when ``torch.cuda.is_available()`` is false. Timed functions on CUDA end with
``torch.cuda.synchronize()`` (``common.timing.timed``) so the wall-clock time covers the
kernels, not just the launches.
"""

import torch

import amaml_ext  # noqa: F401  (registers torch.ops.amaml_ext.*)

from .common import machine


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record the software and hardware that the numbers belong to in the JSON."""
    machine_info["amaml"] = machine.machine_info("cuda" if torch.cuda.is_available() else "cpu")
