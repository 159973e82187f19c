"""``gradient_flow``: the adapted parameters ``u(T)`` as a tensor in the autograd graph, whose
backward is the adjoint over the stored trajectory (:mod:`.flow`)."""

import math
import numbers
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import ode
from ..functional import LossFn
from .checks import check_call
from .core import InnerSolve
from .options import MetaGradOptions


def _check_lr(lr, theta: torch.Tensor) -> Optional[torch.Tensor]:
    """``lr`` as a detached tensor (0-dim or ``[d]``) on theta's device and dtype, or None."""
    if lr is None:
        return None
    if isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        lr = torch.tensor(float(lr))
    if not isinstance(lr, torch.Tensor):
        raise TypeError(f"argument 'lr' must be None, a positive number or a tensor (0-dim or [d]), "
                        f"got {type(lr).__name__}")
    d = theta.numel()
    if lr.dim() != 0 and tuple(lr.shape) != (d,):
        raise ValueError(f"argument 'lr' must be a scalar or have theta's shape [{d}] (one step size per "
                         f"parameter), got shape {tuple(lr.shape)}")
    value = lr.detach().to(device=theta.device, dtype=theta.dtype)
    bad = ~torch.isfinite(value) | (value <= 0)
    if bool(bad.any()):
        first = int(bad.reshape(-1).nonzero()[0])
        raise ValueError(f"argument 'lr' must be finite and > 0 everywhere (it scales the gradient of the "
                         f"training loss), got {value.reshape(-1)[first].item()!r} at index {first}")
    return value


def _check_extras(T, theta: torch.Tensor, adjoint_params, options: MetaGradOptions):
    """``adjoint_params`` as a tuple; a differentiable T refused where it has no derivative."""
    if isinstance(adjoint_params, torch.Tensor):
        adjoint_params = (adjoint_params,)
    try:
        params = tuple(adjoint_params)
    except TypeError:
        raise TypeError(f"argument 'adjoint_params' must be a sequence of tensors, got "
                        f"{type(adjoint_params).__name__}") from None
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or not p.requires_grad:
            got = type(p).__name__ if not isinstance(p, torch.Tensor) else "a tensor with requires_grad=False"
            raise ValueError(f"argument 'adjoint_params' must hold tensors that require grad (the training "
                             f"loss's closure uses them), got {got} at position {i}")
    if params and options.compile is True:
        raise ValueError("argument 'compile' must be False with adjoint_params: their gradients are taken "
                         "through the eager linearisation, which the compiled callbacks do not keep")
    if isinstance(T, torch.Tensor) and T.requires_grad:
        if options.adjoint_scheme.exact_for is not None:
            raise ValueError(f"argument 'T' requires grad, but adjoint={options.solver.adjoint!r} (exact mode) "
                             "differentiates K = T / h GD steps, whose number has no derivative; use a continuous "
                             f"adjoint ({ode.continuous_adjoints()}) to learn T")
        if not T.is_floating_point():
            raise TypeError(f"argument 'T' must be a floating-point tensor to require grad, got {T.dtype}")
    return params


def _check_not_transformed(*inputs) -> None:
    """``torch.func`` transforms (grad, vmap, jvp, hessian) and forward-mode AD cannot go through
    the adjoint (it is a reverse-mode ``autograd.Function`` without a jvp or vmap rule): refuse
    them naming gradient_flow, not with torch's message about ``setup_context``."""
    from torch._C._functorch import is_functorch_wrapped_tensor
    from torch.autograd import forward_ad
    flat = []
    for x in inputs:
        flat += list(x) if isinstance(x, (tuple, list)) else [x]
    for x in flat:
        if isinstance(x, torch.Tensor) and (is_functorch_wrapped_tensor(x) or forward_ad.unpack_dual(x).tangent is not None):
            raise RuntimeError("gradient_flow: its inputs come from a torch.func transform (grad, vmap, jvp, hessian) or "
                               "carry forward-mode tangents; the adjoint is a reverse-mode autograd operation only: "
                               "differentiate through it with torch.autograd (loss.backward(), torch.autograd.grad), once")


@dataclass
class _Job:
    """What the autograd Function carries from its forward to its backward."""

    solve: InnerSolve
    params: Tuple[torch.Tensor, ...]
    stats: Optional[Dict]
    T: Optional[torch.Tensor]
    lr_dtype: Optional[torch.dtype]


class _Flow(torch.autograd.Function):
    """Inputs ``(job, theta, lr, T, *params)``; output ``u(T)``."""

    @staticmethod
    def forward(ctx, job: _Job, theta, lr, T, *params):
        ctx.job = job
        u_T = job.solve.forward()
        if job.stats is not None:
            job.stats.update(job.solve.forward_stats())
        return u_T

    @staticmethod
    def backward(ctx, grad_u):
        if torch.is_grad_enabled():    # create_graph=True: a derivative of this backward is wanted
            raise RuntimeError(
                "gradient_flow: second-order derivatives through gradient_flow are not supported: its backward "
                "(the adjoint solve) is not itself differentiable, so autograd.grad(..., create_graph=True) or "
                ".backward(create_graph=True) through it would silently drop its part of the second derivative. "
                "Differentiate it once (no create_graph), or unroll the inner loop in autograd (amaml_ext.learners."
                "MAML) for higher derivatives.")
        with torch.no_grad():
            return _Flow._backward(ctx, grad_u)

    @staticmethod
    def _backward(ctx, grad_u):
        job, solve = ctx.job, ctx.job.solve
        _, want_theta, want_lr, want_T, *want_params = ctx.needs_input_grad
        params = [p for p, w in zip(job.params, want_params) if w]
        out, checks = solve.backward(grad_u.contiguous(), want_lr=want_lr, params=params, want_T=want_T)
        stats = solve.stats(out, checks)
        if job.stats is not None:
            job.stats.update(stats)
        if not solve.within_tolerance(stats):
            solve.report(stats)
        d_theta = (out.lam.sum(0) if solve.options.batched else out.lam.reshape(-1)) if want_theta else None
        d_T = None
        if want_T:
            d_T = out.d_T.sum().reshape(job.T.shape) if job.T.numel() == 1 else out.d_T
            d_T = d_T.to(job.T.dtype)
        it = iter(out.d_params)
        d_params = [next(it) if w else None for w in want_params]
        d_lr = out.d_lr.to(job.lr_dtype) if want_lr else None
        return (None, d_theta, d_lr, d_T, *d_params)


def gradient_flow(model: nn.Module, loss: LossFn, theta: torch.Tensor, T: Union[float, torch.Tensor], support, *,
                  lr=None, adjoint_params: Sequence[torch.Tensor] = (), stats: Optional[Dict] = None,
                  options: Optional[MetaGradOptions] = None, **option_kwargs) -> torch.Tensor:
    """The parameters after inner training, ``u(T)``, differentiable by the adjoint method.

    Inner training is the gradient flow ``du/dt = -lr * grad L(u)`` from ``u(0) = theta`` on the
    ``support`` loss (``solver="euler"``: ``K = T / h`` GD steps of size ``h * lr``). The forward
    solves it without an autograd graph and keeps the trajectory; ``backward`` receives
    ``dJ/du(T)`` from any computation on the result and solves the adjoint over it with
    Hessian-vector products. Exact mode (``solver="euler", adjoint="discrete"``) gives the
    gradients of the unrolled GD steps; the continuous adjoints (``"heun"``, ``"rk4"``) converge
    at order 2 and 4, with :func:`adjoint_meta_grad`'s error estimate (a warning past
    ``error_tol``; ``strict=True`` raises from ``backward``).

    Args:
        model, loss: as :func:`adjoint_meta_grad`.
        theta: ``[d]`` (:func:`amaml_ext.flatten_params` order); with ``batched=True`` one theta
            shared by the B tasks of ``support``. Gradients reach it.
        T: the horizon; a 0-dim tensor (``[B]`` with ``batched=True``) that requires grad gets
            one (continuous adjoints; a T that is not whole in h runs ``ceil(T / h)`` equal steps).
        support: ``(x, y)``, with a leading task dimension when batched; tensors that require
            grad get gradients (features from a learned map).
        lr: None (1), or a positive scalar or ``[d]`` tensor of step-size multipliers (Meta-SGD).
        adjoint_params: tensors ``loss`` uses through its closure (as torchdiffeq's argument).
        stats: a dict to receive the solver statistics.
        options: a :class:`~amaml_ext.metagrad.MetaGradOptions`, as :func:`adjoint_meta_grad`'s.
        **option_kwargs: :func:`adjoint_meta_grad`'s options (``refine`` excepted).

    Returns:
        torch.Tensor: ``u(T)``, ``[d]`` or ``[B, d]`` with ``batched=True``.

    Raises:
        TypeError, ValueError: as :func:`adjoint_meta_grad`, for these arguments too.
        RuntimeError: the inputs come from a ``torch.func`` transform.

    Example:
        >>> import torch, amaml_ext
        >>> F, net = torch.nn.functional, torch.nn.Linear(2, 1)
        >>> xs, ys, xq, yq = torch.randn(8, 2), torch.randn(8, 1), torch.randn(8, 2), torch.randn(8, 1)
        >>> theta = amaml_ext.flatten_params(net).requires_grad_()
        >>> u = amaml_ext.gradient_flow(net, F.mse_loss, theta, 0.5, (xs, ys), h=0.1, solver="euler", adjoint="discrete")
        >>> pred = torch.func.functional_call(net, amaml_ext.unflatten_params(net, u), (xq,))
        >>> F.mse_loss(pred, yq).backward()          # theta.grad: MAML's meta-gradient (5 steps)
        >>> theta.grad.shape
        torch.Size([3])
    """
    _check_not_transformed(theta, lr, T, adjoint_params)
    opts = MetaGradOptions.build(options, caller="gradient_flow", **option_kwargs)
    if opts.accuracy.refine:
        raise ValueError("argument 'refine' is not available in gradient_flow (its backward runs once, when "
                         "autograd asks); lower h instead")
    _, batch = check_call(model, loss, theta, support, support, opts)
    params = _check_extras(T, theta, adjoint_params, opts)
    # support tensors that require grad (features from a learned map) are inputs like adjoint_params
    params += tuple(t for t in support if t.requires_grad and t.is_floating_point() and all(t is not p for p in params))
    if params:          # their gradients come through the eager linearisation, which compiled HVPs do not keep
        opts = opts.replace(compile=False)
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"argument 'stats' must be None or a dict to fill, got {type(stats).__name__}")
    lr_value = _check_lr(lr, theta)
    if isinstance(T, torch.Tensor) and T.requires_grad and T.numel() == 1:
        # a learned horizon lands anywhere: ceil(T / h) equal steps of T / N <= h
        T_value = float(T.detach())
        opts = opts.replace(h=T_value / max(1, math.ceil(T_value / opts.solver.h - 1e-9)))
    solve = InnerSolve(model, loss, theta, T, support, support, opts, batch, caller="gradient_flow", lr=lr_value)
    solve.flow.fwd.reusable = True          # backward may run more than once (retain_graph, gradcheck)
    job = _Job(solve=solve, params=params, stats=stats, T=T if isinstance(T, torch.Tensor) else None,
               lr_dtype=lr.dtype if isinstance(lr, torch.Tensor) else None)
    lr_in = lr if isinstance(lr, torch.Tensor) else None
    T_in = T if isinstance(T, torch.Tensor) else None
    return _Flow.apply(job, theta, lr_in, T_in, *params)
