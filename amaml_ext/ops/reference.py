"""Plain-PyTorch mirrors of the fused kernels: the same math with ordinary tensor ops.

Tests compare every fused op against these on fresh random inputs, and the benchmarks time
them as the unfused baseline. They allocate and make several passes over memory; the fused
ops make one. Each mirror takes the arguments of its wrapper in :mod:`amaml_ext.ops` in the
same order, without the output buffers, and returns the outputs.
"""

from typing import Sequence, Tuple

import torch

from .core import C as _C

# Dormand-Prince 5(4) weights (Hairer, Norsett & Wanner, II.5, Table 5.2): the numbers of
# csrc/solvers/tableaus.h, their one copy, read through the extension.
_DOPRI5 = _C.tableaus()["dopri5"]
DOPRI5_B = tuple(_DOPRI5["b"])
"""5th-order weights of k1..k6 (b_7 = 0)."""
DOPRI5_E = tuple(_DOPRI5["e"])
"""Embedded error weights of k1..k7."""
DOPRI5_D = tuple(_DOPRI5["d"])
"""Dense-output weights of k1..k7 (Hairer's contd5)."""


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


def batch_norm_double_backward(x: torch.Tensor, weight, mean: torch.Tensor, invstd: torch.Tensor,
                               grad_out: torch.Tensor, ggx=None, ggw=None, ggb=None
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode BatchNorm's double backward: (grad_x, grad_weight, grad_grad_out), with
    P(v) = v - mean(v) - xh mean(v xh) the first backward's projection (per channel)."""
    dims = [0] + list(range(2, x.dim()))
    m = x.numel() // x.shape[1]

    def ch(t):
        return t.reshape(1, -1, *([1] * (x.dim() - 2)))

    def mean_c(t):
        return t.mean(dims, keepdim=True)

    s = ch(invstd)
    ws = s if weight is None else ch(weight) * s
    xh = (x - ch(mean)) * s
    g = grad_out
    q = torch.zeros_like(x) if ggx is None else ggx
    a, qx = mean_c(g * xh), mean_c(q * xh)
    k = (q * g).sum(dims, keepdim=True) - m * mean_c(g) * mean_c(q) - m * a * qx
    pg, pq = g - mean_c(g) - xh * a, q - mean_c(q) - xh * qx
    gw_in = 0.0 if ggw is None else ch(ggw)
    gb_in = 0.0 if ggb is None else ch(ggb)
    grad_x = -(ws * s * k / m) * xh - ws * s * qx * pg - ws * s * a * pq + gw_in * s * pg
    grad_grad_out = ws * pq + gw_in * xh + gb_in
    return grad_x, (s * k).reshape(-1), grad_grad_out
