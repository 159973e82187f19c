"""The HVP implementations compared, each checked against ``double_backward`` at the same
``(u, v)``. A variant is ``(fn, hvps_per_call)``; ``fn()`` returns one HVP (``H v``) or, for
those serving two vectors from one linearisation, the pair ``(H v, H v2)``."""

from typing import Callable, Dict

import torch

from .problem import HvpProblem

REFERENCE = "double_backward"

# torch.func.linearize traces with make_fx; it has segfaulted (F.mse_loss, torch 2.14), so it is
# tried once in a child process before it runs in this one.
CRASH_PRONE = ("linearize_reuse_func",)


def hvp_double_backward(p: HvpProblem, u, v):
    with torch.enable_grad():
        leaf = u.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(p.f_autograd(leaf), leaf, create_graph=True)
        (hv,) = torch.autograd.grad(g, leaf, v)
    return hv


def hvp_fwd_over_rev(p: HvpProblem, u, v):
    return torch.func.jvp(torch.func.grad(p.f_func), (u,), (v,))[1]


def hvp_rev_over_rev_func(p: HvpProblem, u, v):
    return torch.func.vjp(torch.func.grad(p.f_func), u)[1](v)[0]


COMPILE_BASES = {"double_backward": hvp_double_backward, "fwd_over_rev": hvp_fwd_over_rev,
                 "rev_over_rev_func": hvp_rev_over_rev_func}
"""The HVP functions a ``compile_<name>`` variant hands to ``torch.compile``."""


def _linearised(p: HvpProblem) -> Dict[str, Callable]:
    """The variants that linearise once per state and serve 2 HVPs from it."""
    u, v, v2 = p.u, p.v, p.v2
    grad_f = torch.func.grad(p.f_func)

    def linearize_reuse_autograd():
        with torch.enable_grad():
            leaf = u.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(p.f_autograd(leaf), leaf, create_graph=True)
            (h1,) = torch.autograd.grad(g, leaf, v, retain_graph=True)
            (h2,) = torch.autograd.grad(g, leaf, v2, retain_graph=True)
        return h1, h2

    def linearize_reuse_vjp():
        _, vjp_fn = torch.func.vjp(grad_f, u)
        return vjp_fn(v)[0], vjp_fn(v2)[0]

    def linearize_reuse_func():
        _, jvp_fn = torch.func.linearize(grad_f, u)
        return jvp_fn(v), jvp_fn(v2)

    return {"linearize_reuse_autograd": linearize_reuse_autograd, "linearize_reuse_vjp": linearize_reuse_vjp,
            "linearize_reuse_func": linearize_reuse_func}


def make_variants(p: HvpProblem) -> Dict[str, tuple]:
    """name -> (fn, HVPs per call) for every in-process variant (and the gradient, the unit)."""
    u, v, v2 = p.u, p.v, p.v2

    def gradient():
        with torch.enable_grad():
            leaf = u.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(p.f_autograd(leaf), leaf)
        return g

    tf = p.task_functions()
    counter = [0]

    def amaml_hvp_fresh():
        counter[0] += 1
        return tf.hvp(u, v, row=counter[0])

    def amaml_hvp_shared():
        counter[0] += 1
        return tf.hvp(u, v, row=counter[0]), tf.hvp(u, v2, row=counter[0])

    lin = _linearised(p)
    return {
        "gradient": (gradient, 1),
        "double_backward": (lambda: hvp_double_backward(p, u, v), 1),
        "fwd_over_rev": (lambda: hvp_fwd_over_rev(p, u, v), 1),
        "rev_over_rev_func": (lambda: hvp_rev_over_rev_func(p, u, v), 1),
        **{name: (fn, 2) for name, fn in lin.items()},
        "amaml_hvp_fresh": (amaml_hvp_fresh, 1),
        "amaml_hvp_shared": (amaml_hvp_shared, 2),
    }


NOTES = {
    "gradient": "one gradient (the unit)",
    "double_backward": "graph rebuilt per HVP (reference)",
    "fwd_over_rev": "torch.func jvp(grad)",
    "rev_over_rev_func": "torch.func vjp(grad)",
    "linearize_reuse_autograd": "1 lin. + 2 HVPs per state, per HVP",
    "linearize_reuse_vjp": "1 vjp(grad) + 2 vjp_fn per state, per HVP",
    "linearize_reuse_func": "func.linearize + 2 jvp_fn per state, per HVP",
    "amaml_hvp_fresh": "TaskFunctions.hvp, new key each call",
    "amaml_hvp_shared": "TaskFunctions.hvp, 2 calls per key, per HVP",
    "compile_double_backward": "torch.compile(double-backward HVP)",
    "compile_fwd_over_rev": "torch.compile(jvp(grad))",
    "compile_rev_over_rev_func": "torch.compile(vjp(grad))",
}


def references(p: HvpProblem):
    """``(H v, H v2)`` by double backward: what every variant is compared with."""
    return hvp_double_backward(p, p.u, p.v), hvp_double_backward(p, p.u, p.v2)


def rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| in float64."""
    a, ref = a.detach().double(), ref.detach().double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check(out, refs) -> float:
    """The largest :func:`rel_diff` of a variant's result(s) against the references."""
    outs = out if isinstance(out, tuple) else (out,)
    return max(rel_diff(o, r) for o, r in zip(outs, refs))
