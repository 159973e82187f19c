"""The meta-gradient methods compared: ours (``amaml_ext.adjoint_meta_grad`` in six
configurations) and the baselines (MAML unrolled, the authors' two adjoints, torchdiffeq's
odeint_adjoint). Each is ``method(problem, K) -> (grad, stats)``: the gradient of the query
loss after K inner steps of step h, ``[d]`` or ``[B, d]``, and its evaluation counts."""

from typing import Callable, Dict, Optional

import torch

from amaml_ext import adjoint_meta_grad

from ..peers.methods import LEARNER_METHODS, PEER_METHODS
from .problem import GradFlow, MetaGradProblem

try:  # imported with the methods, before any baseline: its import is not part of a method's memory
    import torchdiffeq
except ImportError:  # the torchdiffeq methods then report the error
    torchdiffeq = None


def _ours(solver, adjoint, memory, tolerances=False, compile=False, budget=None):
    """``adjoint_meta_grad`` with these options; ``budget(p, K)``, if given, its ``memory_budget``."""
    def run(p: MetaGradProblem, K: int):
        kw = dict(rtol=p.rtol, atol=p.atol) if tolerances else {}
        if budget is not None:
            kw["memory_budget"] = budget(p, K)
        r = adjoint_meta_grad(p.model, p.loss, p.theta, p.T(K), support=p.support, query=p.query, h=p.h,
                              solver=solver, adjoint=adjoint, memory=memory, compile=compile, batched=p.batched,
                              **kw)
        if compile and not r.stats["compiled"]:
            raise RuntimeError("torch.compile of the callbacks failed (amaml_ext fell back to eager)")
        return r.grad, dict(r.stats)
    return run


_LIN_BYTES: Dict = {}


def _ours_budget(share: float):
    """Exact mode at a memory budget between "store" and "linearise": the states and ``share`` of
    the K linearisations (their size measured by one untimed "linearise" call, cached per
    problem and K: the warm-up makes it)."""
    def budget(p: MetaGradProblem, K: int) -> int:
        key = (id(p), K)
        if key not in _LIN_BYTES:
            probe = adjoint_meta_grad(p.model, p.loss, p.theta, p.T(K), support=p.support, query=p.query, h=p.h,
                                      solver="euler", adjoint="discrete", memory="linearise", batched=p.batched)
            _LIN_BYTES[key] = (probe.stats["trajectory_bytes"], probe.stats["linearisation_bytes"])
        states, lin = _LIN_BYTES[key]
        return states + (int(share * K) + 1) * lin
    return _ours("euler", "discrete", "linearise", budget=budget)


def _ours_revolve(slots: int):
    """Exact mode, checkpointed within a budget of about ``slots`` states: below the sqrt(K)
    layout's need, so the binomial (Revolve) schedule runs (the stats' ``checkpoint_slots``)."""
    return _ours("euler", "discrete", "checkpoint",
                 budget=lambda p, K: (slots + 1) * p.u0.numel() * p.u0.element_size())


def maml_unrolled(p: MetaGradProblem, K: int):
    """Autograd through K GD steps (``create_graph=True``)."""
    th = p.u0.requires_grad_(True)
    u = th
    with torch.enable_grad():
        for _ in range(K):
            (g,) = torch.autograd.grad(p.train_loss(u), u, create_graph=True)
            u = u - p.h * g
        val = p.loss_at(u, p.query)
        (grad,) = torch.autograd.grad(val, th)
    return grad, {"grad_evals": K + 1}


def _need_torchdiffeq() -> None:
    if torchdiffeq is None:
        raise ImportError("torchdiffeq is not installed")


def _rk4_trajectory(p: MetaGradProblem, K: int):
    _need_torchdiffeq()
    flow = GradFlow(p)
    t = torch.linspace(0.0, p.T(K), K + 1, dtype=p.theta.dtype, device=p.theta.device)
    with torch.no_grad():
        states = torchdiffeq.odeint(flow, p.u0, t, method="rk4")
    return states, flow.nfe


def _one_task_at_a_time(method):
    """The authors' code meta-differentiates one task at a time: loop over a meta-batch."""
    def run(p: MetaGradProblem, K: int):
        if not p.batched:
            return method(p, K)
        grads, stats = [], {}
        for b in range(p.tasks):
            g, st = method(p.task(b), K)
            grads.append(g)
            for k, v in st.items():
                stats[k] = stats.get(k, 0) + v
        return torch.stack(grads), stats
    run.__name__ = method.__name__
    return run


@_one_task_at_a_time
def authors_rk4(p: MetaGradProblem, K: int):
    """rk4 forward on the grid; Heun backward with a dense Hessian (``jacobian`` of the gradient)
    at every stored state."""
    states, nfe = _rk4_trajectory(p, K)
    h = p.h

    def grad_fn(u):
        (g,) = torch.autograd.grad(p.train_loss(u), u, create_graph=True)
        return g

    def hessian(u):
        return torch.autograd.functional.jacobian(grad_fn, u, vectorize=p.jacobian_vectorize)

    lam = p.val_grad(states[-1])
    H_next = hessian(states[K])
    for j in range(K, 0, -1):
        k1 = H_next @ lam
        H_prev = hessian(states[j - 1])
        k2 = H_prev @ (lam - h * k1)
        lam = lam - 0.5 * h * (k1 + k2)
        H_next = H_prev
    return lam, {"grad_evals": nfe + 1, "hessians": K + 1}


@_one_task_at_a_time
def authors_heun(p: MetaGradProblem, K: int):
    """rk4 forward on the grid; a Python Heun loop backward with ``autograd.functional.vhp``."""
    states, nfe = _rk4_trajectory(p, K)
    h = p.h
    vhp = torch.autograd.functional.vhp
    lam = p.val_grad(states[-1])
    for j in range(K, 0, -1):
        k1 = vhp(p.train_loss, states[j], lam)[1]
        k2 = vhp(p.train_loss, states[j - 1], lam - h * k1)[1]
        lam = lam - 0.5 * h * (k1 + k2)
    return lam, {"grad_evals": nfe + 1, "hvps": 2 * K}


def odeint_adjoint(p: MetaGradProblem, K: int):
    """torchdiffeq's back-solve adjoint (dopri5) with the parameters as the ODE state."""
    _need_torchdiffeq()
    flow = GradFlow(p)
    y0 = p.u0.requires_grad_(True)
    t = torch.tensor([0.0, p.T(K)], dtype=y0.dtype, device=y0.device)
    ys = torchdiffeq.odeint_adjoint(flow, y0, t, method="dopri5", rtol=p.rtol, atol=p.atol, adjoint_params=())
    nfe_forward = flow.nfe
    with torch.enable_grad():
        val = p.loss_at(ys[-1], p.query)
        (grad,) = torch.autograd.grad(val, y0)
    return grad, {"nfe_forward": nfe_forward, "nfe_backward": flow.nfe - nfe_forward}


METHODS: Dict[str, Callable] = {
    "ours_store": _ours("dopri5", "heun", "store", tolerances=True),
    "ours_exact": _ours("euler", "discrete", "store"),
    "ours_checkpoint": _ours("euler", "discrete", "checkpoint"),
    "ours_exact_linearise": _ours("euler", "discrete", "linearise"),
    "ours_exact_auto": _ours("euler", "discrete", "auto"),
    "ours_exact_b25": _ours_budget(0.25),
    "ours_exact_b50": _ours_budget(0.5),
    "ours_revolve": _ours_revolve(32),
    "ours_dopri5_ckpt": _ours("dopri5", "heun", "checkpoint", tolerances=True),
    "ours_store_compiled": _ours("dopri5", "heun", "store", tolerances=True, compile=True),
    "ours_exact_compiled": _ours("euler", "discrete", "store", compile=True),
    "maml_unrolled": maml_unrolled,
    "authors_rk4": authors_rk4,
    "authors_heun": authors_heun,
    "odeint_adjoint": odeint_adjoint,
}
ALL_METHODS = list(METHODS)
"""The default selection; the peers' and the learners' methods (``benchmarks.peers``) are chosen by
name with ``--methods``: they need the peers' environment (``make peers-env``)."""
METHODS.update(PEER_METHODS)
METHODS.update(LEARNER_METHODS)
OURS = {m for m in METHODS if m.startswith("ours_")}
COMPILED = {m for m in OURS if m.endswith("_compiled")}
CHECKPOINT_PAIRS = (("ours_checkpoint", "ours_exact"), ("ours_revolve", "ours_exact"), ("ours_dopri5_ckpt", "ours_store"))
"""(checkpoint mode, its store mode): the two must give bit-identical gradients."""


def not_applicable(method: str, p: MetaGradProblem) -> Optional[str]:
    if method == "authors_rk4" and p.name != "cosmixture":
        return f"n/a: dense d x d Hessians (d = {p.d}), MLP only"
    return None
