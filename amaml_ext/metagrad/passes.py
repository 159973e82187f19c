"""The two passes of one meta-gradient over a :class:`~amaml_ext.metagrad.plan.Plan`: the
forward solve of the gradient flow (keeping all grid states, or checkpoints to recompute them
from), and the adjoint solve backward over them. The compiled core is reached through
:mod:`amaml_ext.ode` only."""

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from .. import ode
from .._checks import user_stacklevel
from ..functional import TaskFunctions
from . import accuracy
from .options import MetaGradOptions
from .plan import Plan, segments
from .revolve import RevolveCheckpoints


def flow_rhs(fns: TaskFunctions, mask: Optional[torch.Tensor], lr: Optional[torch.Tensor] = None,
             grad: Optional[Callable] = None):
    """``f(t, u) = -lr * grad L(u)`` (``lr`` None: 1; frozen tasks: 0). ``grad(t, u)``, if given,
    supplies the gradient (a tensor of its own, changed in place here)."""
    def f(t: float, u: torch.Tensor) -> torch.Tensor:
        g = (fns.grad(u) if grad is None else grad(t, u)).neg_()
        if lr is not None:
            g = g.mul_(lr)
        return g if mask is None else g.mul_(mask)
    return f


def keeping_rhs(fwd: "Forward", mask: Optional[torch.Tensor], times: torch.Tensor, row0: int):
    """:func:`flow_rhs` for a forward that keeps linearisations for the adjoint: the gradient at
    each grid row comes from :meth:`Forward.kept_grad` while the budget allows, else plainly."""
    row_of = {t: row0 + j for j, t in enumerate(times.tolist())}

    def grad(t: float, u: torch.Tensor) -> torch.Tensor:
        g = fwd.kept_grad(u, row_of.get(t))
        return fwd.fns.grad(u) if g is None else g.clone()     # the kept one is the adjoint's too
    return flow_rhs(fwd.fns, mask, fwd.lr, grad)


def adjoint_rhs(fns: TaskFunctions, mask: Optional[torch.Tensor], lr: Optional[torch.Tensor] = None,
                on_vjp: Optional[Callable] = None, monitor: Optional[accuracy.ErrorMonitor] = None):
    """``vjp(row, u, v) = (df/du)^T v = -H(u) (lr * v)``, one linearisation per grid row (frozen
    tasks: 0). ``on_vjp(row, u, v)``, if given, is called after each, with the linearisation at
    ``u`` kept (the exact sums of an exact adjoint's parameter gradients); ``monitor`` sees each
    product (:meth:`~amaml_ext.metagrad.accuracy.ErrorMonitor.observe`)."""
    def vjp(row: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        x = v if lr is None else v * lr
        hv = fns.hvp(u, x, row=row)
        if monitor is not None:          # frozen rows: weight 0, no quotient
            monitor.observe(x, hv, None if lr is None else v, mask)
        hv.neg_()
        if on_vjp is not None:
            on_vjp(row, u, v)
        return hv if mask is None else hv.mul_(mask)
    return vjp


@dataclass
class AdjointOut:
    """What one adjoint solve hands back: ``lam`` (``lam(0)``, ``[rows, d]``), ``steps``, the
    step-doubling companion ``coarse`` and the invariant ``monitor`` (with the estimate on),
    ``grad_T`` (the training-loss gradient at u(T), where something needed it), and the gradients
    of ``gradient_flow``'s other inputs: ``d_lr``, ``d_params`` and ``d_T`` (per task row)."""

    lam: torch.Tensor
    steps: int
    coarse: Optional[torch.Tensor] = None
    monitor: Optional[accuracy.ErrorMonitor] = None
    grad_T: Optional[torch.Tensor] = None
    d_lr: Optional[torch.Tensor] = None
    d_params: List[torch.Tensor] = field(default_factory=list)
    d_T: Optional[torch.Tensor] = None


class Forward:
    """The forward pass: ``run(u0)`` solves the flow phase by phase; ``rows(phase, c, e)`` then
    hands the backward the grid states ``c..e`` (stored, replayed from an adaptive solve's log,
    or recomputed from a fixed-step checkpoint), top segment first."""

    def __init__(self, fns: TaskFunctions, plan: Plan, options: MetaGradOptions, lr: Optional[torch.Tensor] = None):
        self.fns, self.plan, self.lr = fns, plan, lr
        self.scheme, self.solver = options.forward_scheme, options.solver
        self.reusable = False    # True: rows() keeps the stored states for another backward pass
        self.kept: Dict = {}     # store: (c, e) -> states; fixed-step checkpoint: row -> state
        self.logs: Dict = {}     # adaptive checkpoint: (a, b) -> step log
        self.stats = {"function_evals": 0, "accepted_steps": 0, "rejected_steps": 0}
        self.peak_rows = 0
        # memory="linearise"/"auto": the linearisations of the first rows, as many as fit
        self.keeping = plan.keep and plan.memory == "store" and not fns.compiled
        self.kept_count, self.keep_max, self.lin_bytes = 0, 0, None
        self.revolve: Optional[RevolveCheckpoints] = None     # checkpoints by the binomial schedule

    def kept_grad(self, u: torch.Tensor, row: Optional[int]) -> Optional[torch.Tensor]:
        """The gradient at grid row ``row`` with its linearisation kept for the adjoint, while the
        budget allows (the first one measured: the states and one more linearisation, which the
        adjoint builds as it goes, stay within ``plan.budget``); None: compute it plainly."""
        if not self.keeping or row is None:
            return None
        fns, p = self.fns, self.plan
        if self.lin_bytes is None:
            g, nbytes = fns.keep_linearisation(u, row, measure=True)
            self.lin_bytes = max(1, nbytes)
            room = p.budget - (p.n + 1) * p.state_bytes
            self.keep_max = max(0, room // self.lin_bytes - 1)
            if self.keep_max == 0:
                fns.drop_kept(row)
                self.keeping = False
            else:
                self.kept_count = 1
            return g
        if self.kept_count >= self.keep_max:
            self.keeping = False
            return None
        g, _ = fns.keep_linearisation(u, row)
        self.kept_count += 1
        return g

    def _solve(self, mask, y, c, e):
        p, o = self.plan, self.solver
        times = p.times[c:e + 1]
        f = keeping_rhs(self, mask, times, c) if self.keeping else flow_rhs(self.fns, mask, self.lr)
        return ode.forward_rows(f, y, p.shape, times, o.solver, o.rtol, o.atol, p.max_steps)

    def _count(self, st) -> None:
        for k in self.stats:
            self.stats[k] += st[k]

    def run(self, u0: torch.Tensor) -> torch.Tensor:
        """u(T) (``[rows, d]``)."""
        p, adaptive = self.plan, self.scheme.adaptive
        y = u0.reshape(p.rows, -1)
        if p.memory == "checkpoint" and not adaptive and p.slots:
            return self._run_revolve(y)
        if p.memory == "checkpoint" and not adaptive:
            self.kept[0] = y  # row 0 of the first segment; u0 is our own copy
        with torch.no_grad():
            for a, b, mask in p.phases:
                if p.memory == "checkpoint" and adaptive:
                    y, st, self.logs[(a, b)] = ode.dopri5_logged(flow_rhs(self.fns, mask, self.lr), y, p.shape,
                                                                 p.times[a:b + 1], self.solver.rtol, self.solver.atol,
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
            self.peak_rows = (len(self.kept) + sum(len(log.checkpoints) for log in self.logs.values())
                              + p.m + 1)
        return y

    def _run_revolve(self, y: torch.Tensor) -> torch.Tensor:
        """The checkpointed forward with ``plan.slots`` snapshots placed by the binomial schedule:
        the backward gets each segment's bottom state from :class:`~.revolve.RevolveCheckpoints`
        (restored and re-advanced as the schedule says; bit for bit the forward's)."""
        p = self.plan
        segs = [s for a, b, _ in reversed(p.phases) for s in segments(a, b, p.m)]
        self.revolve = RevolveCheckpoints(segs, p.slots, self._advance)
        with torch.no_grad():
            y = self.revolve.run(y)
        self.peak_rows = min(p.slots, len(segs)) + 1 + p.m + 1
        return y

    def _advance(self, y: torch.Tensor, c: int, e: int) -> torch.Tensor:
        """The state at row ``e`` solved from row ``c``'s (the forward's sweep counts its steps)."""
        mask = next(m for a, b, m in self.plan.phases if a <= c < b)
        seg, st = self._solve(mask, y, c, e)
        if self.revolve.sweeping:
            self._count(st)
        return seg[-1].clone()

    def pieces(self, a: int, b: int):
        return [(a, b)] if self.plan.memory == "store" else segments(a, b, self.plan.m)

    def rows(self, phase, c: int, e: int) -> torch.Tensor:
        a, b, mask = phase
        if self.plan.memory == "store":    # handed over (freed as the adjoint goes) unless reusable
            return self.kept[(c, e)] if self.reusable else self.kept.pop((c, e))
        if self.scheme.adaptive:
            return ode.dopri5_replay_rows(flow_rhs(self.fns, mask, self.lr), self.logs[(a, b)], self.plan.shape, c - a, e - a)
        start = self.revolve.state(c) if self.revolve is not None else self.kept[c]
        return self._solve(mask, start, c, e)[0]


def explain_forward_failure(e: ValueError, options: MetaGradOptions, caller: str = "adjoint_meta_grad") -> ValueError:
    """The forward's ValueError in the meta-gradient's terms (``caller``: the function the user called)."""
    if "non-finite" in str(e):
        return ValueError(f"{caller}: the inner training loss or its gradient became non-finite: {e}")
    if "reached max_steps" in str(e):
        o = options.solver
        fixed = " or ".join(map(repr, ode.grid_forwards()))
        return ValueError(f"{caller}(solver={o.solver!r}, rtol={o.rtol:g}, atol={o.atol:g}, h={o.h:g}): {e}. "
                          f"A training loss that is not smooth (ReLU, max-pool) makes {o.solver}'s steps "
                          f"collapse; solver={fixed} step on the grid instead.")
    return e


def warn_if_steps_collapsed(stats, n: int, options: MetaGradOptions, model, caller: str = "adjoint_meta_grad") -> None:
    """Warn when an adaptive forward took several times more steps than the grid has intervals
    *and* its steps collapsed rather than merely resolved a tight tolerance: the model has
    non-smooth modules (ReLU, max-pool), or a quarter of its steps were rejected (a kink or a stiff
    flow the error control keeps failing on). A smooth flow at a tight rtol takes more, accepted,
    steps than a coarse grid has: that is the tolerance asked for, not a collapse."""
    accepted, rejected = stats["accepted_steps"], stats["rejected_steps"]
    if accepted <= 4 * n:
        return
    kinks = accuracy.nonsmooth_modules(model)
    if not kinks and rejected <= 0.25 * accepted:
        return
    o = options.solver
    fixed = ode.grid_forwards()
    why = (f"the training loss is not smooth (the model has {', '.join(kinks[:3])})" if kinks else
           f"the error control rejected {rejected} steps: the loss has kinks (F.relu, max-pool) or the flow is stiff "
           f"(Hessian eigenvalues near 2/h or above, where GD with step h and the grid adjoint are unstable too: "
           f"rescale the inputs or lower h)")
    warnings.warn(f"{caller}: {o.solver} took {accepted} accepted and {rejected} rejected steps for {n} grid "
                  f"intervals of h={o.h:g} (rtol={o.rtol:g}, atol={o.atol:g}): its steps fell far below h, because "
                  f"{why}. For a non-smooth loss, {' or '.join(f'solver={m!r}' for m in fixed)} on the grid cost less.",
                  RuntimeWarning, stacklevel=user_stacklevel())


def backward(fns: TaskFunctions, fwd: Forward, lam: torch.Tensor, u_T: torch.Tensor, scheme: ode.Scheme,
             error_estimate, sens=None, need_grad_T: bool = False) -> AdjointOut:
    """The adjoint by ``scheme`` from ``lam = lam(T)`` (``[rows, d]``) down to t = 0 over the
    forward's states. ``sens`` (a :class:`~amaml_ext.metagrad.flow.Sensitivities`) collects the
    gradients of the step sizes and of ``adjoint_params`` along the way; ``grad_T``, the
    training-loss gradient at u(T), comes back when the estimate, ``sens`` or ``need_grad_T``
    (dJ/dT) needs it."""
    p, lr = fwd.plan, fwd.lr
    coarse = monitor = None
    grad_T = None
    if sens is not None:         # linearises at u(T): its gradient comes with it
        sens.top(lam, u_T, p.n, p.phases[-1][2])
        grad_T = fns.grad_at(p.n).reshape(p.rows, -1)
    elif error_estimate or need_grad_T:
        grad_T = fns.grad(u_T).reshape(p.rows, -1)
    if error_estimate:
        coarse = lam.clone() if error_estimate == "richardson" else None
        monitor = accuracy.ErrorMonitor(fns.grad_at if lr is None else lambda row: _scaled(fns.grad_at(row), lr),
                                        rows=p.rows)
        monitor.mask = p.phases[-1][2]
        with torch.no_grad():
            monitor.add(lam, grad_T if lr is None else grad_T * lr)
    nodes = [h for h in (monitor and monitor.node, sens and sens.node) if h]
    watch = monitor                  # the stability check runs without the estimate too (it is nearly free)
    if watch is None and scheme.stability_bound is not None and scheme.exact_for is None:    # continuous
        watch = accuracy.ErrorMonitor(lambda row: None, rows=p.rows)
    on_vjp = sens.vjp if sens is not None and scheme.exact_for is not None else None
    steps = 0
    with torch.no_grad(), _unstable(watch, p, scheme):
        for phase in reversed(p.phases):
            a, b, mask = phase
            if monitor is not None:
                monitor.set_mask(mask, lam, b)
            if sens is not None and b < p.n:     # below the top phase: a horizon T_b ends here
                sens.new_phase(b, lam, mask)
            rhs = adjoint_rhs(fns, mask, lr, on_vjp, watch)
            for c, e in fwd.pieces(a, b):
                seg = fwd.rows(phase, c, e)
                lam, st, coarse = ode.adjoint_rows(rhs, seg, p.shape, p.times[c:e + 1], lam, scheme.name, coarse, c,
                                                   _each(nodes))
                steps += st["steps"]
                del seg
    return AdjointOut(lam=lam, steps=steps, coarse=coarse, monitor=monitor, grad_T=grad_T)


@contextmanager
def _unstable(monitor: Optional[accuracy.ErrorMonitor], plan: Plan, scheme: ode.Scheme):
    """A non-finite adjoint after its own Hessian products saw ``h * lambda`` past the scheme's
    stability bound: :class:`~amaml_ext.metagrad.accuracy.AdjointUnstable` (refine can act on it),
    not a diverged inner run."""
    try:
        yield
    except ValueError as e:
        if monitor is None or "non-finite" not in str(e):
            raise
        bound = scheme.stability_bound if scheme.stability_bound is not None else math.inf
        h_lambda = plan.h * monitor.lambda_seen()
        if not h_lambda > bound:
            raise
        raise accuracy.AdjointUnstable("the adjoint solve", h=plan.h, T=plan.T, h_lambda=h_lambda, bound=bound,
                                       adjoint=scheme.name) from e


def _scaled(g: Optional[torch.Tensor], lr: torch.Tensor) -> Optional[torch.Tensor]:
    return None if g is None else g * lr


def _each(hooks):
    """One node callback calling each of ``hooks`` (None when there are none)."""
    if not hooks:
        return None
    if len(hooks) == 1:
        return hooks[0]

    def node(row: int, lam: torch.Tensor) -> None:
        for hook in hooks:
            hook(row, lam)
    return node


def accuracy_stats(fns: TaskFunctions, out: AdjointOut, u0, u_T, plan: Plan, scheme: ode.Scheme, tol: float) -> Dict:
    """The error estimates of a finished adjoint solve, and h * lambda_max when they exceed ``tol``
    (power iterations at u(0), whose linearisation the adjoint made last, and at u(T))."""
    rich = None if out.coarse is None else accuracy.richardson(out.lam, out.coarse, scheme.name)
    stats = accuracy.summary(rich, out.monitor.relative_drift())
    h_lambda_seen = plan.h * out.monitor.lambda_seen()       # the adjoint's own products: a lower bound
    if scheme.stability_bound is not None and h_lambda_seen > scheme.stability_bound:
        stats["adjoint_error_estimate"] = math.inf           # a step past the bound: no error bound at all
    if stats["adjoint_error_estimate"] > tol:
        stats["nonsmooth_modules"] = accuracy.nonsmooth_modules(fns.model)
        lam_max = 0.0
        for row, u in ((0, u0), (plan.n, u_T)):
            lam_max = max(lam_max, accuracy.lambda_max(
                lambda v: fns.hvp(u, v.reshape(u.shape), row=row).reshape(plan.rows, -1), out.lam))
        stats["h_lambda_max"] = max(plan.h * lam_max, h_lambda_seen)
    return stats
