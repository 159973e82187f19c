"""The inner run as one differentiable operation: ``u(T)`` of the gradient flow

    du/dt = f(u) = -lr * grad L(u; phi),   u(0) = theta,

solved forward without an autograd graph, and its vector-Jacobian product by the adjoint
``dlam/dt = -(df/du)^T lam = H(u) (lr * lam)`` from ``lam(T) = dJ/du(T)`` backward over the stored
(or checkpointed) trajectory. With ``lam`` known along the run, every other input's gradient is
an integral over it (docs/design.md, "gradient_flow"):

    dJ/dtheta = lam(0)
    dJ/dlr    = integral_0^T lam^T df/dlr dt   = -integral lam * grad L(u) dt
    dJ/dphi   = integral_0^T lam^T df/dphi dt  = -integral d/dphi [grad L(u; phi) . (lr * lam)] dt
    dJ/dT     = lam(T) . f(u(T))

In exact mode (``euler`` + ``discrete``) the integrals are the exact sums of the K GD steps,
``sum_k h lam_{k+1}^T df/d(.)(u_k)``, taken at the adjoint's own VJP calls. In continuous mode
they are quadratures over the adjoint's nodes of the scheme's order: the trapezoid rule with
Heun, piecewise quadratics (Simpson) with RK4.
"""

from typing import Dict, List, Optional, Sequence

import torch

from ..functional import TaskFunctions
from .passes import Forward, backward, explain_forward_failure, warn_if_dopri5_collapsed
from .plan import Plan, make_plan


def _plus(total: Optional[List[torch.Tensor]], terms: Optional[List[torch.Tensor]]):
    """Elementwise sum of two lists of tensors (None: nothing yet)."""
    if terms is None:
        return total
    return list(terms) if total is None else [a + b for a, b in zip(total, terms)]


def _quadratic_weights(ts: Sequence[float], lo: float, hi: float) -> List[float]:
    """Weights ``w`` with ``sum w_i y_i = integral_lo^hi p`` for the quadratic ``p`` through
    ``(ts[i], y_i)``: the integrals of the three Lagrange basis polynomials."""
    out = []
    for i, ti in enumerate(ts):
        a, b = (t for j, t in enumerate(ts) if j != i)
        # L_i(x) = (x - a)(x - b) / ((ti - a)(ti - b)); integral of x^2 - (a + b) x + a b
        prim = lambda x: x ** 3 / 3 - (a + b) * x ** 2 / 2 + a * b * x  # noqa: E731
        out.append((prim(hi) - prim(lo)) / ((ti - a) * (ti - b)))
    return out


class Quadrature:
    """``integral`` of values given at decreasing times, one node at a time, keeping at most three
    nodes: order 2 is the trapezoid rule, order 4 composite Simpson on pairs of intervals (any
    spacing; a last single interval takes the quadratic through it and the node above)."""

    def __init__(self, order: int):
        self.order = order
        self.nodes: List = []        # (t, values) not yet integrated over, top first
        self.spare = None            # the middle node of the last Simpson panel
        self.total: Optional[List[torch.Tensor]] = None

    def _weighted(self, weights: Sequence[float], nodes) -> None:
        terms = [sum(w * v[k] for w, (_, v) in zip(weights, nodes)) for k in range(len(nodes[0][1]))]
        self.total = _plus(self.total, terms)

    def _trapezoid(self) -> None:
        half = 0.5 * (self.nodes[0][0] - self.nodes[1][0])
        self._weighted((half, half), self.nodes)
        self.nodes = [self.nodes[1]]

    def add(self, t: float, values: List[torch.Tensor]) -> None:
        self.nodes.append((t, values))
        if self.order == 2 and len(self.nodes) == 2:
            self._trapezoid()
        elif self.order == 4 and len(self.nodes) == 3:
            self._weighted(_quadratic_weights([t for t, _ in self.nodes], self.nodes[2][0], self.nodes[0][0]),
                           self.nodes)
            self.spare, self.nodes = self.nodes[1], [self.nodes[2]]

    def result(self) -> Optional[List[torch.Tensor]]:
        if len(self.nodes) == 2:     # order 4: one interval left over
            if self.spare is None:
                self._trapezoid()
            else:                    # the quadratic through it and the node above, over it
                nodes = [self.spare] + self.nodes
                self._weighted(_quadratic_weights([t for t, _ in nodes], nodes[2][0], nodes[1][0]), nodes)
                self.nodes = [self.nodes[1]]
        return self.total


class Sensitivities:
    """The gradients of the step sizes ``lr`` and of ``params`` (``adjoint_params``) collected
    along one adjoint solve; ``grads()`` returns them (``dJ/dlr`` in ``lr``'s shape, then one per
    param)."""

    def __init__(self, fns: TaskFunctions, plan: Plan, adjoint: str, lr: Optional[torch.Tensor],
                 want_lr: bool, params: Sequence[torch.Tensor]):
        self.fns, self.plan, self.lr, self.want_lr, self.params = fns, plan, lr, want_lr, list(params)
        self.discrete = adjoint == "discrete"
        self.quad = Quadrature(2 if adjoint == "heun" else 4)
        self.sums: Optional[List[torch.Tensor]] = None     # exact sums, or the closed phases' integrals
        self.mask: Optional[torch.Tensor] = None

    def _integrand(self, key: float, lam: torch.Tensor) -> List[torch.Tensor]:
        """``lam^T df/dlr`` and ``lam^T df/dphi`` at the state linearised with ``key``."""
        p = self.plan
        w = lam.reshape(p.rows, -1)
        if self.mask is not None:
            w = w * self.mask
        out = []
        if self.want_lr:
            g = self.fns.grad_at(key).reshape(p.rows, -1)
            term = (w * g).neg_().sum(0)
            out.append(term.sum() if self.lr.dim() == 0 else term)
        if self.params:
            lw = w if self.lr is None else w * self.lr
            out += [d.neg() for d in self.fns.param_vjp(lw.reshape(p.shape), self.params, key)]
        return out

    def top(self, lam: torch.Tensor, u_T: torch.Tensor, key: float, mask: Optional[torch.Tensor]) -> None:
        """The node at T: linearise there (the adjoint's first VJP reuses it)."""
        self.fns.linearise(u_T.reshape(self.plan.shape), key)
        self.mask = mask
        if not self.discrete:
            self.quad.add(key, self._integrand(key, lam))

    def new_phase(self, t: float, lam: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        """A phase of per-task horizons starts at ``t`` (going down): tasks whose horizon is ``t``
        become active. The quadrature closes at ``t`` and starts again from the node at ``t``
        with the new mask, so no panel straddles the jump of the integrand there (the node's
        linearisation is still the last one made)."""
        self.mask = mask
        if self.discrete:
            return
        self.sums = _plus(self.sums, self.quad.result())
        self.quad = Quadrature(self.quad.order)
        self.quad.add(t, self._integrand(t, lam))

    def node(self, t: float, lam: torch.Tensor) -> None:
        """A node of a continuous adjoint: ``lam`` is final at ``t``, its linearisation kept."""
        if not self.discrete:
            self.quad.add(t, self._integrand(t, lam))

    def vjp(self, t: float, u: torch.Tensor, v: torch.Tensor) -> None:
        """A VJP of the discrete adjoint at ``u_k`` with ``v = lam_{k+1}``: the term ``h_k a``."""
        p = self.plan
        k = int(round(t * p.n / p.T))
        width = float(p.times[k + 1] - p.times[k])
        self.sums = _plus(self.sums, [width * a for a in self._integrand(t, v)])

    def grads(self) -> List[Optional[torch.Tensor]]:
        if not self.discrete:
            self.sums = _plus(self.sums, self.quad.result())
            self.quad = Quadrature(self.quad.order)
        if self.sums is None:            # no interval at all
            return [None] * (int(self.want_lr) + len(self.params))
        return list(self.sums)


class FlowSolve:
    """One inner run: ``forward()`` gives ``u(T)``; ``backward(lam_T, ...)`` the adjoint from
    ``lam(T)`` with the requested gradients. States are ``[d]``, or ``[B, d]`` when batched."""

    def __init__(self, fns: TaskFunctions, theta: torch.Tensor, T, *, h, solver: str, adjoint: str, rtol: float,
                 atol: float, memory: str, batched: bool, batch: int, memory_budget, max_steps,
                 lr: Optional[torch.Tensor] = None, caller: str = "adjoint_meta_grad", stacklevel: int = 4):
        d = theta.numel()
        self.fns, self.solver, self.adjoint = fns, solver, adjoint
        self.u0 = theta.detach().expand(batch, d).contiguous() if batched else theta.detach().clone()
        self.plan = make_plan(self.u0, T, h, batched=batched, batch=batch, memory=memory,
                              memory_budget=memory_budget, max_steps=max_steps)
        self.lr = lr
        self.fwd = Forward(fns, self.plan, solver, rtol, atol, lr=lr)
        self.rtol, self.atol, self.caller, self.stacklevel = rtol, atol, caller, stacklevel
        self.u_T: Optional[torch.Tensor] = None

    def forward(self) -> torch.Tensor:
        p = self.plan
        try:
            y = self.fwd.run(self.u0)
        except ValueError as e:
            raise explain_forward_failure(e, self.rtol, self.atol, p.h, self.caller) from None
        if self.solver == "dopri5":
            warn_if_dopri5_collapsed(self.fwd.stats, p.n, p.h, self.rtol, self.atol, self.caller, self.stacklevel)
        self.u_T = y.reshape(p.shape).clone()
        return self.u_T

    def backward(self, lam_T: torch.Tensor, *, estimate, want_lr: bool = False,
                 params: Sequence[torch.Tensor] = (), want_T: bool = False) -> Dict:
        """``{"lam", "steps", "coarse", "monitor", "grad_T", "lr", "params", "T"}``: ``lam(0)``
        ``[rows, d]``, then ``dJ/dlr``, ``[dJ/dphi]`` and ``dJ/dT_b`` per task row (``[rows]``)."""
        p = self.plan
        sens = Sensitivities(self.fns, p, self.adjoint, self.lr, want_lr, params) if want_lr or params else None
        lam = lam_T.reshape(p.rows, -1).contiguous()
        lam_top = lam.clone() if want_T else None
        out = backward(self.fns, self.fwd, lam, self.u_T, self.adjoint, estimate, sens, need_grad_T=want_T)
        grads = sens.grads() if sens is not None else []
        out["lr"] = grads[0] if want_lr else None
        out["params"] = grads[int(want_lr):] if params else []
        if want_T:
            f_T = out["grad_T"] if self.lr is None else out["grad_T"] * self.lr
            out["T"] = (lam_top * f_T).sum(-1).neg_()
        return out
