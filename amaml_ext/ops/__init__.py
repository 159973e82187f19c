"""Thin typed wrappers of the fused ops ``torch.ops.amaml_ext.*``, each followed by its fake
(meta) implementation, so the ops work under ``torch.compile`` and pass
``torch.library.opcheck``. The ops only write their outputs and return nothing, so each fake
returns None.

Every op writes into preallocated outputs; the wrappers allocate them when not given.
States are ``[d]`` (one task) or ``[B, d]`` (B tasks), float32 or float64. The same math in
plain PyTorch is in :mod:`amaml_ext.ops.reference`; the training-mode BatchNorm whose double
backward is :func:`batch_norm_double_backward` in :mod:`amaml_ext.ops.batch_norm`; the build facts
in :func:`amaml_ext.build_info`.
"""

from typing import Optional, Sequence, Tuple

import torch

from .core import C  # noqa: F401  (registers the ops)

_ops = torch.ops.amaml_ext

__all__ = ["stage_combine", "dopri5_finish", "dopri5_dense", "heun_update", "batch_norm_double_backward"]


def stage_combine(y: torch.Tensor, stages: Sequence[torch.Tensor], coeffs: Sequence[float],
                  h: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out = y + h * sum_j coeffs[j] * stages[j]`` in one pass (1 to 7 stages).

    Args:
        y: a state ``[d]`` or ``[B, d]``, float32 or float64, CPU or CUDA.
        stages: 1 to 7 tensors of ``y``'s shape, dtype and device.
        coeffs: one float per stage.
        h: the step.
        out: where to write (``y``'s shape); allocated when None.

    Returns:
        torch.Tensor: ``out``.

    Raises:
        RuntimeError: (from the op) mismatched shapes, dtypes or devices, or a wrong number of
            stages or coefficients.

    Example:
        >>> import torch
        >>> y, k = torch.ones(3), torch.arange(3.0)
        >>> stage_combine(y, [k], [0.5], 2.0)
        tensor([1., 2., 3.])
    """
    if out is None:
        out = torch.empty_like(y, memory_format=torch.contiguous_format)
    _ops.stage_combine(y, list(stages), [float(c) for c in coeffs], float(h), out)
    return out


@torch.library.register_fake("amaml_ext::stage_combine")
def _stage_combine_fake(y, stages, coeffs, h, out):
    return None


def dopri5_finish(y0: torch.Tensor, stages: Sequence[torch.Tensor], h: float, rtol: float,
                  atol: float, y1: Optional[torch.Tensor] = None,
                  err: Optional[torch.Tensor] = None,
                  err_norm: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """5th-order solution ``y1``, embedded error ``err`` and per-task RMS error norm
    ``err_norm`` of a DOPRI5 step from its seven stages.

    Args:
        y0: the state at the step's start, ``[d]`` or ``[B, d]``.
        stages: the seven stages ``k1..k7`` (``y0``'s shape).
        h: the step.
        rtol: relative tolerance of the error norm.
        atol: absolute tolerance of the error norm.
        y1: output for the solution (``y0``'s shape), allocated when None.
        err: output for the error (``y0``'s shape), allocated when None.
        err_norm: output for the norm, ``[]`` or ``[B]``, allocated when None.

    Returns:
        ``(y1, err, err_norm)``; the step is accepted where ``err_norm <= 1``.

    Example:
        >>> import torch
        >>> y0, k = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        >>> y1, err, err_norm = dopri5_finish(y0, [k] * 7, 0.1, 1e-6, 1e-8)   # dy/dt = 1
        >>> y1, float(err_norm)
        (tensor([0.1000, 0.1000, 0.1000], dtype=torch.float64), 0.0)
    """
    if y1 is None:
        y1 = torch.empty_like(y0, memory_format=torch.contiguous_format)
    if err is None:
        err = torch.empty_like(y0, memory_format=torch.contiguous_format)
    if err_norm is None:
        err_norm = y0.new_empty(y0.shape[:-1])
    _ops.dopri5_finish(y0, list(stages), float(h), float(rtol), float(atol), y1, err, err_norm)
    return y1, err, err_norm


@torch.library.register_fake("amaml_ext::dopri5_finish")
def _dopri5_finish_fake(y0, stages, h, rtol, atol, y1, err, err_norm):
    return None


def dopri5_dense(y0: torch.Tensor, y1: torch.Tensor, stages: Sequence[torch.Tensor], h: float,
                 thetas: Sequence[float], trajectory: torch.Tensor, first_row: int) -> torch.Tensor:
    """Write ``y(t0 + theta_i h)`` (Hairer's continuous extension of an accepted DOPRI5 step)
    into ``trajectory[first_row + i]`` for each ``theta_i`` in ``[0, 1]``.

    Args:
        y0: the state at the step's start.
        y1: the accepted solution at its end (:func:`dopri5_finish`).
        stages: the step's seven stages.
        h: the step.
        thetas: the fractions of the step to write, each in ``[0, 1]``.
        trajectory: ``[rows, *y0.shape]``, written in place.
        first_row: the row of ``thetas[0]``.

    Returns:
        torch.Tensor: ``trajectory``.

    Example:
        >>> import torch
        >>> y0, k = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
        >>> y1 = y0 + 0.1                                    # dy/dt = 1, one step of 0.1
        >>> dopri5_dense(y0, y1, [k] * 7, 0.1, [0.5, 1.0], torch.zeros(3, 2, dtype=torch.float64), 1)
        tensor([[0.0000, 0.0000],
                [0.0500, 0.0500],
                [0.1000, 0.1000]], dtype=torch.float64)
    """
    _ops.dopri5_dense(y0, y1, list(stages), float(h), [float(t) for t in thetas],
                      int(first_row), trajectory)
    return trajectory


@torch.library.register_fake("amaml_ext::dopri5_dense")
def _dopri5_dense_fake(y0, y1, stages, h, thetas, first_row, trajectory):
    return None


def heun_update(lam: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor], h: float,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Heun adjoint update: ``lam + h/2 (a + b)``, or ``lam + h a`` when ``b`` is None.

    Args:
        lam: the adjoint state, ``[d]`` or ``[B, d]``.
        a: the VJP at the step's start (``lam``'s shape).
        b: the VJP at its end, or None (an Euler step).
        h: the step.
        out: output (``lam``'s shape), allocated when None.

    Returns:
        torch.Tensor: ``out``.

    Example:
        >>> import torch
        >>> heun_update(torch.ones(2), torch.ones(2), torch.full((2,), 3.0), 0.5)
        tensor([2., 2.])
        >>> heun_update(torch.ones(2), torch.ones(2), None, 0.5)
        tensor([1.5000, 1.5000])
    """
    if out is None:
        out = torch.empty_like(lam, memory_format=torch.contiguous_format)
    _ops.heun_update(lam, a, b, float(h), out)
    return out


@torch.library.register_fake("amaml_ext::heun_update")
def _heun_update_fake(lam, a, b, h, out):
    return None


def batch_norm_double_backward(x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor,
                               invstd: torch.Tensor, grad_out: torch.Tensor,
                               ggx: Optional[torch.Tensor] = None, ggw: Optional[torch.Tensor] = None,
                               ggb: Optional[torch.Tensor] = None
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode BatchNorm's double backward, fused: the gradients ``(grad_x, grad_weight,
    grad_grad_out)`` of ``<ggx, gx> + <ggw, gw> + <ggb, gb>``, where ``gx, gw, gb`` is
    ``aten.native_batch_norm_backward(grad_out, x, weight, None, None, mean, invstd, True, eps)``
    (what aten's ``batchnorm_double_backward`` returns). ``x`` is ``[N, C, *]``; ``weight``,
    ``mean``, ``invstd`` (the forward's saved statistics), ``ggw``, ``ggb`` are ``[C]``; a None
    gradient counts as zero, a None weight as ones. ``grad_weight`` does not depend on the weight
    (a caller with no weight drops it). Unlike the other ops it returns new tensors: it is called
    from autograd backward passes and under ``torch.func.vmap`` (its batching rule is below).

    Args:
        x: the BatchNorm input ``[N, C, *]``, float32 or float64.
        weight: ``[C]`` or None.
        mean: ``[C]``, the batch mean the forward saved.
        invstd: ``[C]``, the forward's ``1 / sqrt(var + eps)``.
        grad_out: ``x``'s shape, the first backward's incoming gradient.
        ggx: ``x``'s shape, or None.
        ggw: ``[C]``, or None.
        ggb: ``[C]``, or None.

    Returns:
        ``(grad_x [N, C, *], grad_weight [C], grad_grad_out [N, C, *])``, new tensors.

    Example:
        >>> import torch
        >>> x = torch.randn(4, 2, 3, dtype=torch.float64)
        >>> mean, invstd = x.mean((0, 2)), (x.var((0, 2), unbiased=False) + 1e-5).rsqrt()
        >>> gx, gw, ggy = batch_norm_double_backward(x, None, mean, invstd, torch.randn_like(x), torch.randn_like(x))
        >>> gx.shape, gw.shape, ggy.shape
        (torch.Size([4, 2, 3]), torch.Size([2]), torch.Size([4, 2, 3]))
    """
    return _ops.batch_norm_double_backward(x, weight, mean, invstd, grad_out, ggx, ggw, ggb)


@torch.library.register_fake("amaml_ext::batch_norm_double_backward")
def _batch_norm_double_backward_fake(x, weight, mean, invstd, grad_out, ggx, ggw, ggb):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[1]),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@torch.library.register_vmap("amaml_ext::batch_norm_double_backward")
def _batch_norm_double_backward_vmap(info, in_dims, x, weight, mean, invstd, grad_out, ggx, ggw, ggb):
    """B problems [N, C, *] as one [N, B*C, *]: the statistics are per (problem, channel)."""
    b = info.batch_size

    def front(t, d):
        return None if t is None else t.movedim(d, 0) if d is not None else t.expand(b, *t.shape)

    xs = front(x, in_dims[0])
    n, c, rest = xs.shape[1], xs.shape[2], xs.shape[3:]
    elems = [None if t is None else t.movedim(0, 1).reshape(n, b * c, *rest)
             for t in (xs, front(grad_out, in_dims[4]), front(ggx, in_dims[5]))]
    chans = [None if t is None else front(t, d).reshape(b * c)
             for t, d in ((weight, in_dims[1]), (mean, in_dims[2]), (invstd, in_dims[3]),
                          (ggw, in_dims[6]), (ggb, in_dims[7]))]
    gx, gw, ggy = _ops.batch_norm_double_backward(elems[0], chans[0], chans[1], chans[2], elems[1],
                                                  elems[2], chans[3], chans[4])
    return (gx.reshape(n, b, c, *rest), gw.reshape(b, c), ggy.reshape(n, b, c, *rest)), (1, 0, 1)
