import os

import pytest
import torch

# compile="auto" (the learners' default) compiles dense models on the CPU: seconds per model and
# shape, for every small model the tests build. The tests run the eager callbacks unless a test
# asks for compile=True or sets AMAML_EXT_COMPILE itself (test_compile_auto_* do); the compiled
# path has its own tests against the eager one.
os.environ.setdefault("AMAML_EXT_COMPILE", "off")

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
