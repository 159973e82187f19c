import pytest
import torch

from helpers import DEVICES  # noqa: F401  (its home is helpers.py; kept importable from here)


def pytest_collection_modifyitems(config, items):
    # Tests marked `cuda` need a GPU: on a machine without one they are reported as skipped
    # (they run, and must pass, on the GPU machine: see docs/benchmarks.md).
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
