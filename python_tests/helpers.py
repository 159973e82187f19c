"""What several test files share: the devices to run on and the relative error. Fixtures and
hooks stay in conftest.py."""

import torch

F64 = torch.float64

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
"""For ``@pytest.mark.parametrize("device", DEVICES)``: the CPU, and CUDA where one is visible."""


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ``||a - b|| / ||b||`` (2-norm over all entries)."""
    return float((a - b).norm() / b.norm())
