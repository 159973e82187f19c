"""adjoint_meta_grad: the A-MAML meta-gradient of a long inner training run.

Inner training is the gradient flow ``du/dt = -grad L(u)``, ``u(0) = theta``; the meta-loss
is the validation loss ``V(u(T))``. Forward: :func:`amaml_ext.ode.solve_forward` stores
``u`` on the grid ``t_j = j h``. Backward: the adjoint ``dlam/dt = Hess L(u(t)) lam``,
``lam(T) = grad V(u(T))``, solved by :func:`amaml_ext.ode.solve_adjoint` with
Hessian-vector products; ``dJ/dtheta = lam(0)``. No autograd graph spans the run.

``solver="euler", adjoint="discrete"`` is the exact gradient of ``K = T / h`` plain
gradient-descent steps with step size h, which is what MAML computes by unrolling.
"""

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import nn

from .. import ode
from . import accuracy
from .accuracy import AdjointAccuracyError, AdjointAccuracyWarning
from ..functional import TaskFunctions
from .checks import check_call, check_solver_options
from .flow import FlowSolve
from .passes import Forward, accuracy_stats
from .plan import MEMORY_MODES, Plan


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
    """

    grad: torch.Tensor
    loss: torch.Tensor
    params: torch.Tensor
    stats: Dict[str, Any] = field(default_factory=dict)


def adjoint_meta_grad(model: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      theta: torch.Tensor, T: Union[float, torch.Tensor], *, support, query,
                      h: float = 0.01, solver: str = "dopri5", adjoint: str = "heun",
                      rtol: float = 1e-6, atol: float = 1e-8, memory: str = "store",
                      batched: bool = False, memory_budget: Optional[int] = None,
                      max_steps: Optional[int] = None, compile: Union[bool, str] = False,
                      error_estimate: Union[bool, str] = True, error_tol: float = 1e-2, strict: bool = False,
                      refine: bool = False, _refinements: int = 0) -> MetaGradResult:
    """The A-MAML meta-gradient ``d V(u(T)) / d theta`` of inner training by gradient flow.

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
        max_steps: dopri5 step limit, accepted + rejected (default ``max(1000, 10 N)``).
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
        refine: when the estimate exceeds ``error_tol`` on a smooth flow, solve again on the
            finer grid the estimate suggests (up to 3 times); ``stats["h"]`` is the grid used.

    Returns:
        :class:`MetaGradResult`.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> theta = amaml_ext.flatten_params(net)
        >>> xs, ys = torch.randn(10, 1), torch.randn(10, 1)
        >>> r = amaml_ext.adjoint_meta_grad(net, torch.nn.functional.mse_loss, theta, 1.0,
        ...                                 support=(xs, ys), query=(xs, ys))
        >>> r.grad.shape
        torch.Size([...])
    """
    call = {k: v for k, v in locals().items() if k not in ("h", "_refinements")}  # for a refined re-solve
    d, batch, error_tol = check_call(model, loss, theta, support, query, solver=solver, adjoint=adjoint,
                                     memory=memory, batched=batched, compile=compile, strict=strict, refine=refine,
                                     error_estimate=error_estimate, error_tol=error_tol, memory_modes=MEMORY_MODES)
    check_solver_options(rtol, atol, max_steps, memory_budget)
    estimate = error_estimate if error_estimate is not False and ode.ADJOINT_SCHEMES[adjoint].error_estimate else False
    fns = TaskFunctions(model, loss, support, query, batched, compile=compile)
    flow = FlowSolve(fns, theta, T, h=h, solver=solver, adjoint=adjoint, rtol=rtol, atol=atol, memory=memory,
                     batched=batched, batch=batch, memory_budget=memory_budget, max_steps=max_steps)
    plan, fwd = flow.plan, flow.fwd
    fns.check_model(flow.u0, strict, "adjoint_meta_grad")
    u_T = flow.forward()
    val_loss, lam_T = fns.value_and_grad_val(u_T)
    if not bool(torch.isfinite(val_loss).all()) or not bool(torch.isfinite(lam_T).all()):
        what = "loss" if not bool(torch.isfinite(val_loss).all()) else "loss's gradient"
        raise ValueError(f"adjoint_meta_grad: the validation {what} at u(T) (t={plan.T}, step {plan.n}) is "
                         f"non-finite (the data are finite; loss {val_loss.tolist()}): the inner run diverged, lower "
                         "T or h")
    try:
        out = flow.backward(lam_T, estimate=estimate)
        checks = accuracy_stats(fns, out, flow.u0, u_T, plan, adjoint, error_tol) if estimate else {}
    finally:
        fns.release()

    stats = _stats(fns, fwd, out, plan, solver, adjoint, error_tol if estimate else None)
    stats.update(checks)
    result = MetaGradResult(grad=out["lam"].view(plan.shape), loss=val_loss, params=u_T, stats=stats)
    if not estimate or stats["adjoint_error_estimate"] <= error_tol:
        return result
    return _past_tolerance(result, plan, dict(call, error_tol=error_tol), _refinements)


def _stats(fns: TaskFunctions, fwd: Forward, out: Dict[str, Any], plan: Plan, solver: str, adjoint: str,
           error_tol: Optional[float]) -> Dict[str, Any]:
    """``MetaGradResult.stats`` of a solve, before the accuracy statistics are added."""
    return {
        "grad_evals": fns.grad_evals + 1,  # + the validation gradient
        "hvps": fns.hvp_evals,
        "linearisations": fns.linearisations,
        "compiled": fns.compiled,
        "accepted_steps": fwd.stats["accepted_steps"],
        "rejected_steps": fwd.stats["rejected_steps"],
        "grid_steps": plan.n,
        "adjoint_steps": out["steps"],
        "trajectory_bytes": fwd.peak_rows * plan.state_bytes,
        "memory": plan.memory,
        "solver": solver,
        "adjoint": adjoint,
        "h": plan.h,
        "error_tol": error_tol,
        "adjoint_error_estimate": None, "richardson_estimate": None, "invariant_drift": None,
        "h_lambda_max": None, "nonsmooth_modules": None,
    }


def _past_tolerance(result: MetaGradResult, plan: Plan, call: Dict[str, Any], refinements: int) -> MetaGradResult:
    """An estimate past the tolerance: solve again on a finer grid (``refine``, smooth models, up
    to 3 times), or raise (``strict``), or warn."""
    stats, tol, solver, adjoint = result.stats, call["error_tol"], call["solver"], call["adjoint"]
    bound = accuracy.stability_bound(solver, adjoint)
    if call["refine"] and not accuracy.is_nonsmooth(stats, tol, bound) and refinements < 3:
        h_new = accuracy.suggested_h(estimate=stats["adjoint_error_estimate"], tol=tol, h=plan.h, T=plan.T,
                                     adjoint=adjoint, h_lambda=stats["h_lambda_max"], bound=bound)
        if h_new < plan.h * (1 - 1e-9):
            return adjoint_meta_grad(**call, h=h_new, _refinements=refinements + 1)
    msg = "adjoint_meta_grad: " + accuracy.advice(stats, tol=tol, h=plan.h, T=plan.T, solver=solver, adjoint=adjoint)
    if call["strict"]:
        raise AdjointAccuracyError(msg)
    warnings.warn(msg, AdjointAccuracyWarning, stacklevel=3 + refinements)
    return result
