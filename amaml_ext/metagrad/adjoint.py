"""adjoint_meta_grad: the A-MAML meta-gradient of a long inner training run.

Inner training is the gradient flow ``du/dt = -grad L(u)``, ``u(0) = theta``; the meta-loss
is the validation loss ``V(u(T))``. Forward: :func:`amaml_ext.ode.solve_forward` stores
``u`` on the grid ``t_j = j h``. Backward: the adjoint ``dlam/dt = Hess L(u(t)) lam``,
``lam(T) = grad V(u(T))``, solved by :func:`amaml_ext.ode.solve_adjoint` with
Hessian-vector products; ``dJ/dtheta = lam(0)``. No autograd graph spans the run.

``solver="euler", adjoint="discrete"`` is the exact gradient of ``K = T / h`` plain
gradient-descent steps with step size h, which is what MAML computes by unrolling.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import nn

from .accuracy import AdjointUnstable
from .core import MAX_REFINEMENTS, InnerSolve
from .options import MetaGradOptions


@dataclass
class MetaGradResult:
    """Result of :func:`adjoint_meta_grad`.

    Attributes:
        grad: meta-gradient ``dV(u(T))/dtheta``: ``[d]``, or ``[B, d]`` (per task) when batched.
        loss: validation loss at ``u(T)``: ``[]``, or ``[B]`` when batched.
        params: adapted parameters ``u(T)``: ``[d]`` or ``[B, d]``.
        stats: ``grad_evals``, ``hvps``, ``linearisations``, ``accepted_steps``,
            ``rejected_steps``, ``grid_steps`` (N), ``trajectory_bytes`` (stored states at the
            peak), ``memory`` (mode used), ``solver``, ``adjoint``; for a continuous adjoint
            with the estimate on: ``adjoint_error_estimate`` (relative error of the gradient,
            max over tasks), ``invariant_drift``, ``richardson_estimate`` (with
            ``error_estimate="richardson"``), ``h_lambda_max`` (computed when the estimate
            exceeds the tolerance, else None), ``nonsmooth_modules``, ``error_tol`` and
            ``h`` (the grid used; differs from the argument after ``refine``).
            See :mod:`amaml_ext.metagrad.accuracy`.

    Example:
        >>> import torch, amaml_ext
        >>> net, x = torch.nn.Linear(2, 1), torch.randn(6, 2)
        >>> r = amaml_ext.adjoint_meta_grad(net, torch.nn.functional.mse_loss, amaml_ext.flatten_params(net), 0.2,
        ...                                 support=(x, x[:, :1]), query=(x, x[:, :1]), h=0.1, solver="euler",
        ...                                 adjoint="discrete")
        >>> r.params.shape, r.stats["memory"] in ("linearise", "store", "checkpoint")
        (torch.Size([3]), True)
    """

    grad: torch.Tensor
    loss: torch.Tensor
    params: torch.Tensor
    stats: Dict[str, Any] = field(default_factory=dict)


def adjoint_meta_grad(model: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      theta: torch.Tensor, T: Union[float, torch.Tensor], *, support, query,
                      options: Optional[MetaGradOptions] = None, **option_kwargs) -> MetaGradResult:
    """The A-MAML meta-gradient ``d V(u(T)) / d theta`` of inner training by gradient flow.

    Options are keywords (or ``options``, a :class:`~amaml_ext.metagrad.MetaGradOptions`, with
    keywords overriding its fields); they are checked once, here, into that object.

    Args:
        model: any ``nn.Module``; its parameters are replaced by ``theta`` (never mutated).
        loss: ``loss(pred, target) -> scalar``, e.g. ``torch.nn.functional.mse_loss``.
        theta: flat parameters ``[d]`` in ``model.named_parameters()`` order
            (:func:`amaml_ext.flatten_params`).
        T: inner horizon (``T = K h`` is K GD steps of size h), or with ``batched=True`` a
            tensor ``[B]`` of per-task horizons (a task stays fixed after its own T).
        support, query: ``(x, y)`` of one task; with ``batched=True`` B tasks, every tensor with
            a leading task dimension.
        h: grid spacing (the GD step size for ``solver="euler"``); ``T / h`` must be whole.
        solver: ``"dopri5"``, ``"rk4"`` or ``"euler"`` (:data:`amaml_ext.ode.FORWARD_METHODS`).
        adjoint: ``"heun"``, ``"rk4"`` or ``"discrete"`` (:data:`amaml_ext.ode.ADJOINT_METHODS`).
        rtol, atol: dopri5 tolerances.
        memory: ``"store"`` keeps all N+1 grid states; ``"checkpoint"`` about ``2 sqrt(N)``,
            recomputing segments (the same gradient); ``"auto"`` stores when the trajectory fits
            ``memory_budget`` bytes (default: half the free GPU memory, or a quarter of the RAM).
        memory_budget: bytes for ``memory="auto"``.
        max_steps: dopri5 step limit, accepted + rejected (default ``max(1000, 10 N)``, :func:`amaml_ext.ode.default_max_steps`).
        compile: gradients and HVPs from ``torch.compile``-d ``torch.func`` functions: 2.4-3.5x
            per meta-gradient for small models after a one-off compilation (docs/benchmarks.md);
            falls back to eager with a warning. ``stats["compiled"]`` says which ran. ``"auto"``
            compiles where it pays (dense models on the CPU); one call stays eager unless asked,
            the learners default to ``"auto"``.
        error_estimate: estimate the relative error of a continuous adjoint by the drift of the
            invariant ``lam . grad L`` (:mod:`amaml_ext.metagrad.accuracy`; about 3% of a meta-gradient);
            ``"richardson"`` adds step doubling; ``False`` turns it off. Exact mode has none.
        error_tol: relative error above which :class:`amaml_ext.AdjointAccuracyWarning` is
            issued, naming the estimate, ``h * lambda_max`` and what to do.
        strict: raise :class:`amaml_ext.AdjointAccuracyError` instead of warning.
        refine: when the estimate exceeds ``error_tol`` on a smooth flow, or the adjoint
            overflows past its stability bound, solve again on the finer grid the estimate
            suggests (up to 3 times); ``stats["h"]`` is the grid used.
        options: a :class:`~amaml_ext.metagrad.MetaGradOptions` holding any of the above.

    Returns:
        MetaGradResult: the meta-gradient, the validation loss, ``u(T)`` and the statistics.

    Raises:
        TypeError: a wrong kind of argument (model, loss, tensors, option types), or an unknown option.
        ValueError: a bad value (shapes, dtypes, devices, non-finite data, ``T / h`` not whole, a
            ``discrete`` adjoint after another solver, ...), each naming the argument; a model the
            solvers cannot use (dropout in training mode, a graph cut); an inner run that diverged.
        AdjointAccuracyError: with ``strict=True``, the error estimate exceeds ``error_tol``.
        AdjointUnstable: (a FloatingPointError) the adjoint overflowed where its own Hessian
            products saw ``h * lambda`` past its scheme's stability bound, without ``refine``.

    Example:
        >>> import torch, amaml_ext
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> theta = amaml_ext.flatten_params(net)
        >>> xs, ys = torch.randn(10, 1), torch.randn(10, 1)
        >>> r = amaml_ext.adjoint_meta_grad(net, torch.nn.functional.mse_loss, theta, 1.0,
        ...                                 support=(xs, ys), query=(xs, ys), h=0.1)
        >>> r.grad.shape, r.loss.shape, r.stats["grid_steps"]
        (torch.Size([25]), torch.Size([]), 10)
    """
    opts = MetaGradOptions.build(options, caller="adjoint_meta_grad", **option_kwargs)
    for refinements in range(MAX_REFINEMENTS + 1):
        solve = InnerSolve.start(model, loss, theta, T, support, query, opts, caller="adjoint_meta_grad")
        try:
            result = _solve(solve)
        except AdjointUnstable as e:      # the adjoint overflowed past its stability bound
            if not opts.accuracy.refine or refinements >= MAX_REFINEMENTS:
                raise
            opts = opts.replace(h=e.h_within)
            continue
        if solve.within_tolerance(result.stats):
            return result
        h_new = solve.refined_h(result.stats, refinements)
        if h_new is None:
            break
        opts = opts.replace(h=h_new)
    solve.report(result.stats)
    return result


def _solve(solve: InnerSolve) -> MetaGradResult:
    """Forward, the validation loss and its gradient at u(T), backward."""
    plan = solve.plan
    u_T = solve.forward()
    val_loss, lam_T = solve.fns.value_and_grad_val(u_T)
    if not bool(torch.isfinite(val_loss).all()) or not bool(torch.isfinite(lam_T).all()):
        solve.fns.release()
        what = "loss" if not bool(torch.isfinite(val_loss).all()) else "loss's gradient"
        raise ValueError(f"adjoint_meta_grad: the validation {what} at u(T) (t={plan.T}, step {plan.n}) is "
                         f"non-finite (the data are finite; loss {val_loss.tolist()}): the inner run diverged, lower "
                         "T or h")
    out, checks = solve.backward(lam_T)
    stats = solve.stats(out, checks, extra_grad_evals=1)        # + the validation gradient
    return MetaGradResult(grad=out.lam.view(plan.shape), loss=val_loss, params=u_T, stats=stats)
