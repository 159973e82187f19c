"""What several test files share: the devices to run on, the relative error, small seeded
models and regression tasks. Fixtures and hooks stay in conftest.py."""

from typing import Iterable, Optional, Tuple

import torch

from amaml_ext import models

F64 = torch.float64

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
"""For ``@pytest.mark.parametrize("device", DEVICES)``: the CPU, and CUDA where one is visible."""


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ``||a - b|| / ||b||`` (2-norm over all entries)."""
    return float((a - b).norm() / b.norm())


def mlp(seed: Optional[int] = 0, width: int = 16, depth: int = 2,
        dtype: Optional[torch.dtype] = F64) -> torch.nn.Sequential:
    """:func:`amaml_ext.models.mlp` (2 inputs, ``depth`` tanh layers of ``width``, 1 output)
    initialised after ``torch.manual_seed(seed)`` (``seed=None``: from the global generator as it
    stands), in ``dtype`` (``None``: float32, as built)."""
    if seed is not None:
        torch.manual_seed(seed)
    net = models.mlp(width=width, depth=depth)
    return net if dtype is None else net.to(dtype)


def small_conv4(channels: int = 4, ways: int = 3) -> models.Conv4:
    """:class:`amaml_ext.models.Conv4` (4 x conv3x3-BN-ReLU-maxpool) for 1-channel 16x16 images,
    narrow for tests; float32, initialised from the global generator."""
    return models.Conv4(ways=ways, in_channels=1, channels=channels, image_size=16)


def regression_task(seed: int, n: int = 20, dtype: torch.dtype = F64,
                    device="cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` points ``x`` uniform in [-1, 1]^2 (seeded), ``y = cos(3 x_1) + x_2^2 / 2``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=dtype) * 2 - 1
    y = torch.cos(3 * x[:, :1]) + 0.5 * x[:, 1:] ** 2
    return x.to(device), y.to(device)


def stack_tasks(sets: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-task ``(x, y)`` sets stacked into one batched ``(x [B, ...], y [B, ...])``."""
    xs, ys = zip(*sets)
    return torch.stack(xs), torch.stack(ys)
