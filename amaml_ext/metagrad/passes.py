"""The two passes of one meta-gradient over a :class:`~amaml_ext.metagrad.plan.Plan`: the
forward solve of the gradient flow (keeping all grid states, or checkpoints to recompute them
from), and the adjoint solve backward over them. The compiled core is reached through
:mod:`amaml_ext.ode` only."""

import warnings
from typing import Callable, Dict, Optional

import torch

from .. import ode
from . import accuracy
from ..functional import TaskFunctions
from .plan import Plan, segments


def flow_rhs(fns: TaskFunctions, mask: Optional[torch.Tensor], lr: Optional[torch.Tensor] = None):
    """``f(t, u) = -lr * grad L(u)`` (``lr`` None: 1; frozen tasks: 0)."""
    def f(t: float, u: torch.Tensor) -> torch.Tensor:
        g = fns.grad(u).neg_()
        if lr is not None:
            g = g.mul_(lr)
        return g if mask is None else g.mul_(mask)
    return f


def adjoint_rhs(fns: TaskFunctions, mask: Optional[torch.Tensor], lr: Optional[torch.Tensor] = None,
                on_vjp: Optional[Callable] = None):
    """``vjp(t, u, v) = (df/du)^T v = -H(u) (lr * v)``, one linearisation per grid time (frozen
    tasks: 0). ``on_vjp(t, u, v)``, if given, is called after each, with the linearisation at
    ``u`` kept (the exact sums of the discrete adjoint's parameter gradients)."""
    def vjp(t: float, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        hv = fns.hvp(u, v if lr is None else v * lr, key=t).neg_()
        if on_vjp is not None:
            on_vjp(t, u, v)
        return hv if mask is None else hv.mul_(mask)
    return vjp


class Forward:
    """The forward pass: ``run(u0)`` solves the flow phase by phase; ``rows(phase, c, e)`` then
    hands the backward the grid states ``c..e`` (stored, replayed from a dopri5 log, or
    recomputed from a fixed-step checkpoint), top segment first."""

    def __init__(self, fns: TaskFunctions, plan: Plan, solver: str, rtol: float, atol: float,
                 lr: Optional[torch.Tensor] = None):
        self.fns, self.plan, self.solver, self.rtol, self.atol, self.lr = fns, plan, solver, rtol, atol, lr
        self.reusable = False    # True: rows() keeps the stored states for another backward pass
        self.kept: Dict = {}     # store: (c, e) -> states; fixed-step checkpoint: row -> state
        self.logs: Dict = {}     # dopri5 checkpoint: (a, b) -> step log
        self.stats = {"function_evals": 0, "accepted_steps": 0, "rejected_steps": 0}
        self.peak_rows = 0

    def _solve(self, mask, y, c, e):
        p = self.plan
        return ode.forward_rows(flow_rhs(self.fns, mask, self.lr), y, p.shape, p.times[c:e + 1], self.solver, self.rtol,
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
                    y, st, self.logs[(a, b)] = ode.dopri5_logged(flow_rhs(self.fns, mask, self.lr), y, p.shape,
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
        if self.plan.memory == "store":    # handed over (freed as the adjoint goes) unless reusable
            return self.kept[(c, e)] if self.reusable else self.kept.pop((c, e))
        if self.solver == "dopri5":
            return ode.dopri5_replay_rows(flow_rhs(self.fns, mask, self.lr), self.logs[(a, b)], self.plan.shape, c - a, e - a)
        return self._solve(mask, self.kept[c], c, e)[0]


def explain_forward_failure(e: ValueError, rtol: float, atol: float, h: float,
                            caller: str = "adjoint_meta_grad") -> ValueError:
    """The forward's ValueError in the meta-gradient's terms (``caller``: the function the user called)."""
    if "non-finite" in str(e):
        return ValueError(f"{caller}: the inner training loss or its gradient became non-finite: {e}")
    if "reached max_steps" in str(e):
        return ValueError(f"{caller}(solver='dopri5', rtol={rtol:g}, atol={atol:g}, h={h:g}): {e}. "
                          f"A training loss that is not smooth (ReLU, max-pool) makes dopri5's steps "
                          f"collapse; solver='rk4' or 'euler' step on the grid instead.")
    return e


def warn_if_dopri5_collapsed(stats, n: int, h: float, rtol: float, atol: float, caller: str = "adjoint_meta_grad",
                             stacklevel: int = 3) -> None:
    """Warn when dopri5 needed several times more steps than the grid has intervals: its steps
    collapsed (a smooth flow at tight tolerances may take a few more steps than a coarse grid;
    a ReLU net takes ten times as many)."""
    if stats["accepted_steps"] > 4 * n:
        warnings.warn(f"{caller}: dopri5 took {stats['accepted_steps']} accepted and "
                      f"{stats['rejected_steps']} rejected steps for {n} grid intervals of h={h:g} (rtol={rtol:g}, "
                      f"atol={atol:g}): its steps fell far below h, because the training loss is not smooth (ReLU, "
                      f"max-pool) or the flow is stiff (Hessian eigenvalues near 2/h or above, where GD "
                      f"with step h and the grid adjoint are unstable too: rescale the inputs or lower h). "
                      f"For a non-smooth loss, solver='rk4' or 'euler' on the grid cost less.", RuntimeWarning,
                      stacklevel=stacklevel)


def backward(fns: TaskFunctions, fwd: Forward, lam: torch.Tensor, u_T: torch.Tensor, adjoint: str,
             error_estimate, sens=None, need_grad_T: bool = False) -> Dict:
    """The adjoint from ``lam = lam(T)`` (``[rows, d]``) down to t = 0 over the forward's states:
    ``{"lam", "steps", "coarse", "monitor"}`` (the last two with the error estimate on).
    ``sens`` (a :class:`~amaml_ext.metagrad.flow.Sensitivities`) collects the gradients of the
    step sizes and of ``adjoint_params`` along the way; ``grad_T``, the training-loss gradient at
    u(T), comes back when the estimate, ``sens`` or ``need_grad_T`` (dJ/dT) needs it."""
    p, lr = fwd.plan, fwd.lr
    coarse = monitor = None
    grad_T = None
    if sens is not None:         # linearises at u(T): its gradient comes with it
        key = float(p.times[-1])
        sens.top(lam, u_T, key, p.phases[-1][2])
        grad_T = fns.grad_at(key).reshape(p.rows, -1)
    elif error_estimate or need_grad_T:
        grad_T = fns.grad(u_T).reshape(p.rows, -1)
    if error_estimate:
        coarse = lam.clone() if error_estimate == "richardson" else None
        monitor = accuracy.ErrorMonitor(fns.grad_at if lr is None else lambda t: _scaled(fns.grad_at(t), lr))
        monitor.mask = p.phases[-1][2]
        with torch.no_grad():
            monitor.add(lam, grad_T if lr is None else grad_T * lr)
    nodes = [h for h in (monitor and monitor.node, sens and sens.node) if h]
    steps = 0
    with torch.no_grad():
        for phase in reversed(p.phases):
            a, b, mask = phase
            if monitor is not None:
                monitor.set_mask(mask, lam, float(p.times[b]))
            if sens is not None and b < p.n:     # below the top phase: a horizon T_b ends here
                sens.new_phase(float(p.times[b]), lam, mask)
            rhs = adjoint_rhs(fns, mask, lr, sens.vjp if sens is not None and adjoint == "discrete" else None)
            for c, e in fwd.pieces(a, b):
                seg = fwd.rows(phase, c, e)
                lam, st, coarse = ode.adjoint_rows(rhs, seg, p.shape, p.times[c:e + 1], lam, adjoint, coarse, c,
                                                   _each(nodes))
                steps += st["steps"]
                del seg
    return {"lam": lam, "steps": steps, "coarse": coarse, "monitor": monitor, "grad_T": grad_T}


def _scaled(g: Optional[torch.Tensor], lr: torch.Tensor) -> Optional[torch.Tensor]:
    return None if g is None else g * lr


def _each(hooks):
    """One node callback calling each of ``hooks`` (None when there are none)."""
    if not hooks:
        return None
    if len(hooks) == 1:
        return hooks[0]

    def node(t: float, lam: torch.Tensor) -> None:
        for hook in hooks:
            hook(t, lam)
    return node


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
