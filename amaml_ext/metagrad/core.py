"""The one core solve both front doors wrap: :func:`~amaml_ext.adjoint_meta_grad` (forward, the
validation gradient, backward) and :func:`~amaml_ext.gradient_flow` (forward now, backward when
autograd asks). An :class:`InnerSolve` checks the call once, builds the model's functions and
the plan, and hands back typed results; the statistics and the accuracy verdict are made here
and nowhere else."""

import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .._checks import user_stacklevel
from ..functional import TaskFunctions
from . import accuracy
from .accuracy import AdjointAccuracyError, AdjointAccuracyWarning
from .checks import check_call
from .flow import FlowSolve
from .options import MetaGradOptions
from .passes import AdjointOut, accuracy_stats

MAX_REFINEMENTS = 3
"""How many times ``refine=True`` solves again on a finer grid."""


class InnerSolve:
    """One inner run of the gradient flow on ``support`` and its adjoint, by ``options``.

    ``start`` checks the call (:func:`~amaml_ext.metagrad.checks.check_call`) and builds it;
    ``forward()`` gives ``u(T)``; ``backward(lam_T, ...)`` the adjoint with its accuracy
    statistics (:class:`~amaml_ext.metagrad.passes.AdjointOut`, dict)."""

    def __init__(self, model, loss, theta: torch.Tensor, T, support, query, options: MetaGradOptions, batch: int, *,
                 caller: str, lr: Optional[torch.Tensor] = None):
        self.options, self.caller = options, caller
        self.fns = TaskFunctions(model, loss, support, query, options.batched, compile=options.compile)
        self.flow = FlowSolve(self.fns, theta, T, options, batch, lr=lr, caller=caller)
        self.fns.check_model(self.flow.u0, options.accuracy.strict, caller)

    @classmethod
    def start(cls, model, loss, theta: torch.Tensor, T, support, query, options: MetaGradOptions, *,
              caller: str, **kw) -> "InnerSolve":
        _, batch = check_call(model, loss, theta, support, query, options)
        return cls(model, loss, theta, T, support, query, options, batch, caller=caller, **kw)

    @property
    def plan(self):
        return self.flow.plan

    def forward(self) -> torch.Tensor:
        return self.flow.forward()

    def backward(self, lam_T: torch.Tensor, *, want_lr: bool = False, params: Sequence[torch.Tensor] = (),
                 want_T: bool = False) -> Tuple[AdjointOut, Dict[str, Any]]:
        """The adjoint from ``lam_T`` and, with the estimate on, its accuracy statistics. The
        kept linearisation is released whatever happens."""
        o = self.options
        try:
            out = self.flow.backward(lam_T, want_lr=want_lr, params=params, want_T=want_T)
            checks = (accuracy_stats(self.fns, out, self.flow.u0, self.flow.u_T, self.plan, o.adjoint_scheme,
                                     o.accuracy.error_tol) if o.estimate else {})
        except accuracy.AdjointUnstable as e:          # named by the user's call
            raise accuracy.AdjointUnstable(self.caller, **e.numbers) from e.__cause__
        finally:
            self.fns.release()
        return out, checks

    def forward_stats(self) -> Dict[str, Any]:
        """The statistics known once the forward has run."""
        p, fwd, o = self.plan, self.flow.fwd, self.options
        states = fwd.peak_rows * p.state_bytes
        lin = fwd.lin_bytes
        return {**fwd.stats, "grid_steps": p.n, "trajectory_bytes": states,
                "memory": "linearise" if fwd.kept_count else p.memory, "memory_budget": p.budget,
                "kept_linearisations": fwd.kept_count, "linearisation_bytes": lin,
                "checkpoint_slots": p.slots or None,
                "recomputed_segments": fwd.revolve.advances if fwd.revolve is not None else None,
                "planned_peak_bytes": states + (fwd.kept_count + 1) * lin if lin else None,
                "solver": o.solver.solver, "adjoint": o.solver.adjoint, "h": p.h, "compiled": self.fns.compiled}

    def stats(self, out: AdjointOut, checks: Dict[str, Any], extra_grad_evals: int = 0) -> Dict[str, Any]:
        """Every statistic of the solve (``MetaGradResult.stats``; ``gradient_flow``'s ``stats``)."""
        fns, o = self.fns, self.options
        stats = self.forward_stats()
        stats.update({
            "grad_evals": fns.grad_evals + extra_grad_evals,
            "hvps": fns.hvp_evals,
            "linearisations": fns.linearisations,
            "param_vjps": fns.param_vjps,
            "adjoint_steps": out.steps,
            "error_tol": o.accuracy.error_tol if o.estimate else None,
            "adjoint_error_estimate": None, "richardson_estimate": None, "invariant_drift": None,
            "h_lambda_max": None, "nonsmooth_modules": None,
        })
        stats.update(checks)
        return stats

    def within_tolerance(self, stats: Dict[str, Any]) -> bool:
        estimate = stats.get("adjoint_error_estimate")
        return estimate is None or estimate <= self.options.accuracy.error_tol

    def refined_h(self, stats: Dict[str, Any], refinements: int) -> Optional[float]:
        """With ``refine=True``, on a smooth flow, fewer than :data:`MAX_REFINEMENTS` times: the
        finer grid step the estimate suggests; else None."""
        o, p = self.options, self.plan
        tol, bound = o.accuracy.error_tol, accuracy.stability_bound(o.solver.solver, o.solver.adjoint)
        if not o.accuracy.refine or refinements >= MAX_REFINEMENTS or accuracy.is_nonsmooth(stats, tol, bound):
            return None
        h_new = accuracy.suggested_h(estimate=stats["adjoint_error_estimate"], tol=tol, h=p.h, T=p.T,
                                     adjoint=o.solver.adjoint, h_lambda=stats["h_lambda_max"], bound=bound)
        return h_new if h_new < p.h * (1 - 1e-9) else None

    def report(self, stats: Dict[str, Any]) -> None:
        """An estimate past the tolerance: :class:`AdjointAccuracyError` with ``strict``, else
        :class:`AdjointAccuracyWarning`, naming the numbers and what to do."""
        o, p = self.options, self.plan
        msg = f"{self.caller}: " + accuracy.advice(stats, tol=o.accuracy.error_tol, h=p.h, T=p.T,
                                                  solver=o.solver.solver, adjoint=o.solver.adjoint)
        if o.accuracy.strict:
            raise AdjointAccuracyError(msg)
        warnings.warn(msg, AdjointAccuracyWarning, stacklevel=user_stacklevel())
