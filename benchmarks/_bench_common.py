"""Helpers shared by the benchmark modules (imported as a plain module: pytest puts this
folder on sys.path because it has no __init__.py)."""

import math

import pytest
import torch

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ]),
]


def sync(device: str) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str):
    """``fn`` followed by a device synchronisation: what the benchmark times."""
    if device == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
        return run
    return fn


def d_label(d: int) -> str:
    """``1e6`` for 10**6; plain digits for a d that is not a power of ten."""
    e = round(math.log10(d)) if d > 0 else 0
    return f"1e{e}" if 10 ** e == d else str(d)
