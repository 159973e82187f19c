"""Shared pieces of the benchmark suite (pytest-benchmark).

Run explicitly (``testpaths`` in pyproject.toml only covers python_tests)::

    python -m pytest benchmarks -q --benchmark-columns=median,iqr,rounds \
        --benchmark-sort=name --benchmark-json=bench.json
    python benchmarks/summarize.py bench.json

Every benchmark is parametrized by device; the ``cuda`` parameter is skipped when
``torch.cuda.is_available()`` is false. Timed functions on CUDA end with
``torch.cuda.synchronize()`` so the wall-clock time covers the kernels, not just the launches.
"""

import os

import torch

import amaml_ext  # noqa: F401  (registers torch.ops.amaml_ext.*)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record the software and hardware that the numbers belong to in the JSON."""
    info = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        info["amaml_ext"] = amaml_ext.build_info()
    except Exception as exc:  # pragma: no cover - informational only
        info["amaml_ext"] = f"unavailable: {exc}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    try:
        import torchdiffeq
        info["torchdiffeq"] = torchdiffeq.__version__
    except ImportError:
        pass
    machine_info["amaml"] = info
