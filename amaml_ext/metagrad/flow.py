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

from typing import List, Optional, Sequence

import torch

from .. import ode
from ..functional import TaskFunctions
from .options import MetaGradOptions
from .passes import AdjointOut, Forward, backward, explain_forward_failure, warn_if_steps_collapsed
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
    along one adjoint solve by ``scheme``; ``grads()`` returns them (``dJ/dlr`` in ``lr``'s shape,
    then one per param). An exact adjoint sums them at its own VJPs; a continuous one integrates
    them over its nodes by the quadrature of its ``quadrature_order``. Nodes are grid rows."""

    def __init__(self, fns: TaskFunctions, plan: Plan, scheme: ode.Scheme, lr: Optional[torch.Tensor],
                 want_lr: bool, params: Sequence[torch.Tensor]):
        self.fns, self.plan, self.lr, self.want_lr, self.params = fns, plan, lr, want_lr, list(params)
        self.exact = scheme.exact_for is not None
        self.quad = None if self.exact else Quadrature(scheme.quadrature_order)
        self.sums: Optional[List[torch.Tensor]] = None     # exact sums, or the closed phases' integrals
        self.mask: Optional[torch.Tensor] = None
        self.t = plan.times.tolist()

    def _integrand(self, row: int, lam: torch.Tensor) -> List[torch.Tensor]:
        """``lam^T df/dlr`` and ``lam^T df/dphi`` at the state linearised at ``row``."""
        p = self.plan
        w = lam.reshape(p.rows, -1)
        if self.mask is not None:
            w = w * self.mask
        out = []
        if self.want_lr:
            g = self.fns.grad_at(row).reshape(p.rows, -1)
            term = (w * g).neg_().sum(0)
            out.append(term.sum() if self.lr.dim() == 0 else term)
        if self.params:
            lw = w if self.lr is None else w * self.lr
            out += [d.neg() for d in self.fns.param_vjp(lw.reshape(p.shape), self.params, row)]
        return out

    def top(self, lam: torch.Tensor, u_T: torch.Tensor, row: int, mask: Optional[torch.Tensor]) -> None:
        """The node at T (grid row ``row``): linearise there (the adjoint's first VJP reuses it)."""
        self.fns.linearise(u_T.reshape(self.plan.shape), row)
        self.mask = mask
        if not self.exact:
            self.quad.add(self.t[row], self._integrand(row, lam))

    def new_phase(self, row: int, lam: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        """A phase of per-task horizons starts at grid row ``row`` (going down): tasks whose
        horizon ends there become active. The quadrature closes there and starts again from that
        node with the new mask, so no panel straddles the jump of the integrand (the node's
        linearisation is still the last one made)."""
        self.mask = mask
        if self.exact:
            return
        self.sums = _plus(self.sums, self.quad.result())
        self.quad = Quadrature(self.quad.order)
        self.quad.add(self.t[row], self._integrand(row, lam))

    def node(self, row: int, lam: torch.Tensor) -> None:
        """A node of a continuous adjoint: ``lam`` is final at ``row``, its linearisation kept."""
        if not self.exact:
            self.quad.add(self.t[row], self._integrand(row, lam))

    def vjp(self, row: int, u: torch.Tensor, v: torch.Tensor) -> None:
        """A VJP of an exact adjoint at ``u_k`` (row k) with ``v = lam_{k+1}``: the term ``h_k a``."""
        width = self.t[row + 1] - self.t[row]
        self.sums = _plus(self.sums, [width * a for a in self._integrand(row, v)])

    def grads(self) -> List[Optional[torch.Tensor]]:
        if not self.exact:
            self.sums = _plus(self.sums, self.quad.result())
            self.quad = Quadrature(self.quad.order)
        if self.sums is None:            # no interval at all
            return [None] * (int(self.want_lr) + len(self.params))
        return list(self.sums)


class FlowSolve:
    """One inner run: ``forward()`` gives ``u(T)``; ``backward(lam_T, ...)`` the adjoint from
    ``lam(T)`` with the requested gradients. States are ``[d]``, or ``[B, d]`` when batched."""

    def __init__(self, fns: TaskFunctions, theta: torch.Tensor, T, options: MetaGradOptions, batch: int, *,
                 lr: Optional[torch.Tensor] = None, caller: str = "adjoint_meta_grad"):
        d = theta.numel()
        self.fns, self.options = fns, options
        self.u0 = theta.detach().expand(batch, d).contiguous() if options.batched else theta.detach().clone()
        self.plan = make_plan(self.u0, T, options, batch)
        self.lr = lr
        self.fwd = Forward(fns, self.plan, options, lr=lr)
        self.caller = caller
        self.u_T: Optional[torch.Tensor] = None

    def forward(self) -> torch.Tensor:
        p = self.plan
        try:
            y = self.fwd.run(self.u0)
        except ValueError as e:
            raise explain_forward_failure(e, self.options, self.caller) from None
        if self.options.forward_scheme.adaptive:
            warn_if_steps_collapsed(self.fwd.stats, p.n, self.options, self.fns.model, self.caller)
        self.u_T = y.reshape(p.shape).clone()
        return self.u_T

    def backward(self, lam_T: torch.Tensor, *, want_lr: bool = False, params: Sequence[torch.Tensor] = (),
                 want_T: bool = False) -> AdjointOut:
        """The adjoint from ``lam_T``, with ``dJ/dlr``, ``[dJ/dphi]`` and ``dJ/dT_b`` per task row
        (``[rows]``) where asked."""
        p, scheme = self.plan, self.options.adjoint_scheme
        sens = Sensitivities(self.fns, p, scheme, self.lr, want_lr, params) if want_lr or params else None
        lam = lam_T.reshape(p.rows, -1).contiguous()
        lam_top = lam.clone() if want_T else None
        out = backward(self.fns, self.fwd, lam, self.u_T, scheme, self.options.estimate, sens, need_grad_T=want_T)
        grads = sens.grads() if sens is not None else []
        out.d_lr = grads[0] if want_lr else None
        out.d_params = grads[int(want_lr):] if params else []
        if want_T:
            f_T = out.grad_T if self.lr is None else out.grad_T * self.lr
            out.d_T = (lam_top * f_T).sum(-1).neg_()
        return out
