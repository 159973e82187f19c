"""The two passes of one meta-gradient over a :class:`~amaml_ext.metagrad.plan.Plan`: the
forward solve of the gradient flow (keeping all grid states, or checkpoints to recompute them
from), and the adjoint solve backward over them. The compiled core is reached through
:mod:`amaml_ext.ode` only."""

import warnings
from typing import Dict, Optional

import torch

from .. import accuracy, ode
from ..functional import TaskFunctions
from .plan import Plan, segments


def flow_rhs(fns: TaskFunctions, mask: Optional[torch.Tensor]):
    """``f(t, u) = -grad L(u)`` (frozen tasks: 0)."""
    def f(t: float, u: torch.Tensor) -> torch.Tensor:
        g = fns.grad(u).neg_()
        return g if mask is None else g.mul_(mask)
    return f


def adjoint_rhs(fns: TaskFunctions, mask: Optional[torch.Tensor]):
    """``vjp(t, u, v) = -H(u) v``, one linearisation per grid time (frozen tasks: 0)."""
    def vjp(t: float, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        hv = fns.hvp(u, v, key=t).neg_()
        return hv if mask is None else hv.mul_(mask)
    return vjp


class Forward:
    """The forward pass: ``run(u0)`` solves the flow phase by phase; ``rows(phase, c, e)`` then
    hands the backward the grid states ``c..e`` (stored, replayed from a dopri5 log, or
    recomputed from a fixed-step checkpoint), top segment first."""

    def __init__(self, fns: TaskFunctions, plan: Plan, solver: str, rtol: float, atol: float):
        self.fns, self.plan, self.solver, self.rtol, self.atol = fns, plan, solver, rtol, atol
        self.kept: Dict = {}     # store: (c, e) -> states; fixed-step checkpoint: row -> state
        self.logs: Dict = {}     # dopri5 checkpoint: (a, b) -> step log
        self.stats = {"function_evals": 0, "accepted_steps": 0, "rejected_steps": 0}
        self.peak_rows = 0

    def _solve(self, mask, y, c, e):
        p = self.plan
        return ode.forward_rows(flow_rhs(self.fns, mask), y, p.shape, p.times[c:e + 1], self.solver, self.rtol,
                                self.atol, p.max_steps)

    def _count(self, st) -> None:
        for k in self.stats:
            self.stats[k] += st[k]

    def run(self, u0: torch.Tensor) -> torch.Tensor:
        """u(T) (``[rows, d]``)."""
        p = self.plan
        y = u0.reshape(p.rows, -1)
        if p.memory == "checkpoint" and self.solver != "dopri5":
            self.kept[0] = y  # row 0 of the first segment; u0 is our own copy
        with torch.no_grad():
            for a, b, mask in p.phases:
                if p.memory == "checkpoint" and self.solver == "dopri5":
                    y, st, self.logs[(a, b)] = ode.dopri5_logged(flow_rhs(self.fns, mask), y, p.shape,
                                                                 p.times[a:b + 1], self.rtol, self.atol,
                                                                 p.max_steps, p.m)
                    self._count(st)
                    continue
                pieces = [(a, b)] if p.memory == "store" else list(reversed(segments(a, b, p.m)))
                for c, e in pieces:
                    seg, st = self._solve(mask, y, c, e)
                    self._count(st)
                    if p.memory == "store":
                        self.kept[(c, e)] = seg
                        self.peak_rows += e - c + 1
                        y = seg[-1]
                    else:
                        y = self.kept[e] = seg[-1].clone()
                    del seg
        if p.memory == "checkpoint":
            self.peak_rows = (len(self.kept) + sum(len(log["checkpoints"]) for log in self.logs.values())
                              + p.m + 1)
        return y

    def pieces(self, a: int, b: int):
        return [(a, b)] if self.plan.memory == "store" else segments(a, b, self.plan.m)

    def rows(self, phase, c: int, e: int) -> torch.Tensor:
        a, b, mask = phase
        if self.plan.memory == "store":
            return self.kept.pop((c, e))
        if self.solver == "dopri5":
            return ode.dopri5_replay_rows(flow_rhs(self.fns, mask), self.logs[(a, b)], self.plan.shape, c - a, e - a)
        return self._solve(mask, self.kept[c], c, e)[0]


def explain_forward_failure(e: ValueError, rtol: float, atol: float, h: float) -> ValueError:
    """The forward's ValueError in the meta-gradient's terms."""
    if "non-finite" in str(e):
        return ValueError(f"adjoint_meta_grad: the inner training loss or its gradient became non-finite: {e}")
    if "reached max_steps" in str(e):
        return ValueError(f"adjoint_meta_grad(solver='dopri5', rtol={rtol:g}, atol={atol:g}, h={h:g}): {e}. "
                          f"A training loss that is not smooth (ReLU, max-pool) makes dopri5's steps "
                          f"collapse; solver='rk4' or 'euler' step on the grid instead.")
    return e


def warn_if_dopri5_collapsed(stats, n: int, h: float, rtol: float, atol: float) -> None:
    if stats["accepted_steps"] > n:
        warnings.warn(f"adjoint_meta_grad: dopri5 took {stats['accepted_steps']} accepted and "
                      f"{stats['rejected_steps']} rejected steps for {n} grid intervals of h={h:g} (rtol={rtol:g}, "
                      f"atol={atol:g}): its steps fell below h, because the training loss is not smooth (ReLU, "
                      f"max-pool) or the flow is stiff (Hessian eigenvalues near 2/h or above, where GD "
                      f"with step h and the grid adjoint are unstable too: rescale the inputs or lower h). "
                      f"For a non-smooth loss, solver='rk4' or 'euler' on the grid cost less.", RuntimeWarning,
                      stacklevel=3)


def backward(fns: TaskFunctions, fwd: Forward, lam: torch.Tensor, u_T: torch.Tensor, adjoint: str,
             error_estimate) -> Dict:
    """The adjoint from ``lam = lam(T)`` (``[rows, d]``) down to t = 0 over the forward's states:
    ``{"lam", "steps", "coarse", "monitor"}`` (the last two with the error estimate on)."""
    p = fwd.plan
    coarse = monitor = None
    if error_estimate:
        coarse = lam.clone() if error_estimate == "richardson" else None
        monitor = accuracy.ErrorMonitor(fns.grad_at)
        monitor.mask = p.phases[-1][2]
        with torch.no_grad():
            monitor.add(lam, fns.grad(u_T).reshape(p.rows, -1))
    steps = 0
    with torch.no_grad():
        for phase in reversed(p.phases):
            a, b, mask = phase
            if monitor is not None:
                monitor.set_mask(mask, lam, float(p.times[b]))
            for c, e in fwd.pieces(a, b):
                seg = fwd.rows(phase, c, e)
                lam, st, coarse = ode.adjoint_rows(adjoint_rhs(fns, mask), seg, p.shape, p.times[c:e + 1], lam,
                                                   adjoint, coarse, c, None if monitor is None else monitor.node)
                steps += st["steps"]
                del seg
    return {"lam": lam, "steps": steps, "coarse": coarse, "monitor": monitor}


def accuracy_stats(fns: TaskFunctions, out: Dict, u0, u_T, plan: Plan, adjoint: str, tol: float) -> Dict:
    """The error estimates of a finished adjoint solve, and h * lambda_max when they exceed ``tol``
    (power iterations at u(0), whose linearisation the adjoint made last, and at u(T))."""
    lam, coarse = out["lam"], out["coarse"]
    rich = None if coarse is None else accuracy.richardson(lam, coarse, adjoint)
    stats = accuracy.summary(rich, out["monitor"].relative_drift())
    if stats["adjoint_error_estimate"] > tol:
        stats["nonsmooth_modules"] = accuracy.nonsmooth_modules(fns.model)
        lam_max = 0.0
        for key, u in ((float(plan.times[0]), u0), (plan.T, u_T)):
            lam_max = max(lam_max, accuracy.lambda_max(
                lambda v: fns.hvp(u, v.reshape(u.shape), key=key).reshape(plan.rows, -1), lam))
        stats["h_lambda_max"] = plan.h * lam_max
    return stats
