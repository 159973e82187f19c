"""Plain-PyTorch mirrors of the fused kernels: the same math with ordinary tensor ops.

Tests compare every fused op against these on fresh random inputs, and the benchmarks time
them as the unfused baseline. They allocate and make several passes over memory; the fused
ops make one.
"""

from typing import Sequence, Tuple

import torch

# Dormand-Prince 5(4) weights (Hairer, Norsett & Wanner, Table 5.2); see csrc/dopri5_tableau.h.
DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
DOPRI5_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)
DOPRI5_D = (-12715105075 / 11282082432, 0.0, 87487479700 / 32700410799,
            -10690763975 / 1880347072, 701980252875 / 199316789632,
            -1453857185 / 822651844, 69997945 / 29380423)


def _weighted(stages: Sequence[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
    acc = coeffs[0] * stages[0]
    for c, k in zip(coeffs[1:], stages[1:]):
        acc = acc + c * k
    return acc


def stage_combine(y: torch.Tensor, stages: Sequence[torch.Tensor], coeffs: Sequence[float],
                  h: float) -> torch.Tensor:
    return y + h * _weighted(stages, coeffs)


def dopri5_finish(y0: torch.Tensor, stages: Sequence[torch.Tensor], h: float, rtol: float,
                  atol: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y1 = y0 + h * _weighted(stages[:6], DOPRI5_B)
    err = h * _weighted(stages, DOPRI5_E)
    scale = atol + rtol * torch.maximum(y0.abs(), y1.abs())
    norm = (err / scale).square().mean(dim=-1).sqrt()
    return y1, err, norm


def dopri5_dense(y0: torch.Tensor, y1: torch.Tensor, stages: Sequence[torch.Tensor], h: float,
                 thetas: Sequence[float]) -> torch.Tensor:
    ydiff = y1 - y0
    bspl = h * stages[0] - ydiff
    r4 = ydiff - h * stages[6] - bspl
    r5 = h * _weighted(stages, DOPRI5_D)
    rows = []
    for th in thetas:
        if th == 1.0:
            rows.append(y1.clone())
        else:
            rows.append(y0 + th * (ydiff + (1 - th) * (bspl + th * (r4 + (1 - th) * r5))))
    return torch.stack(rows)


def heun_update(lam: torch.Tensor, a: torch.Tensor, b, h: float) -> torch.Tensor:
    if b is None:
        return lam + h * a
    return lam + (h / 2) * (a + b)
