"""pytest parameters shared by the pytest-benchmark suites (test_bench_*.py)."""

import pytest
import torch

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ]),
]
"""Every benchmark runs on the CPU and, where ``torch.cuda.is_available()``, on the GPU."""
