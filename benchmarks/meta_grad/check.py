"""Correctness of every selected method at one K (``--check-k``), in the parent process: against
``maml_unrolled`` in the same dtype, unrolled GD in float64 and the float64 gradient flow
(``adjoint_meta_grad`` rk4/rk4 on a grid h/8); and whether each checkpoint mode is
bit-identical to its store mode. Each method runs under ``--timeout`` (SIGALRM)."""

import contextlib
import signal
import threading
import time
from typing import Dict, List

import torch

from amaml_ext import adjoint_meta_grad

from .methods import CHECKPOINT_PAIRS, METHODS, maml_unrolled, not_applicable
from .problem import build_problem

FINE = 8
"""The flow reference's grid is h / FINE."""


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; a ``[d]`` against a ``[B, d]`` reference is compared with the
    reference's mean over the tasks (the learners' meta-gradient)."""
    if a.dim() == b.dim() - 1:
        b = b.mean(0)
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return ((a - b).norm() / b.norm()).item()


class CheckTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise CheckTimeout in this (main) thread after ``seconds`` (SIGALRM; the methods spend
    their time in Python callbacks, where the signal is delivered)."""
    if seconds <= 0 or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise CheckTimeout(f"time-out: over {seconds:g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _run_checked(method: str, p, K: int, timeout: float):
    """(status row, gradient or None) of one method at K."""
    t0 = time.perf_counter()
    try:
        with time_limit(timeout):
            g, _ = METHODS[method](p, K)
    except CheckTimeout:
        return {"status": f"timeout: over {timeout:g} s"}, None
    except Exception as e:  # noqa: BLE001
        return {"status": f"error: {type(e).__name__}: {str(e)[:200]}"}, None
    return {"status": "ok", "seconds": time.perf_counter() - t0}, g


def correctness_check(args, methods: List[str]) -> Dict:
    K = args.check_k
    p = build_problem(args)
    p64 = p.to(torch.float64)
    ref_gd, _ = maml_unrolled(p64, K)
    ref_flow = adjoint_meta_grad(p64.model, p64.loss, p64.theta, p64.T(K), support=p64.support, query=p64.query,
                                 h=p.h / FINE, solver="rk4", adjoint="rk4", batched=p64.batched).grad
    rows, grads = {}, {}
    for m in methods:
        why = not_applicable(m, p)
        if why:
            rows[m] = {"status": why}
            continue
        rows[m], g = _run_checked(m, p, K, args.timeout)
        if g is not None:
            grads[m] = g
            rows[m].update(rel_vs_gd_f64=rel(g, ref_gd), rel_vs_flow_f64=rel(g, ref_flow))
    if "maml_unrolled" not in grads:
        grads["maml_unrolled"], _ = maml_unrolled(p, K)
    for m, g in grads.items():
        if m in rows:
            rows[m]["rel_vs_maml_unrolled"] = rel(g, grads["maml_unrolled"])
    pairs = {}
    for ck, st in CHECKPOINT_PAIRS:
        if ck in grads and st in grads:
            pairs[f"{ck} vs {st}"] = {"bit_identical": bool(torch.equal(grads[ck], grads[st])),
                                      "rel": rel(grads[ck], grads[st])}
    return {"K": K, "dtype": args.dtype, "flow_reference": f"float64 rk4/rk4 h/{FINE}",
            "gd_vs_flow_f64": rel(ref_gd, ref_flow), "methods": rows, "checkpoint_vs_store": pairs}


def check_table(check: Dict) -> str:
    out = [f"Correctness at K = {check['K']} ({check['dtype']}); references in float64: unrolled GD, and the "
           f"gradient flow ({check['flow_reference']}); GD vs flow in float64: {check['gd_vs_flow_f64']:.2e}",
           "",
           "| method | rel. err vs maml_unrolled (same dtype) | vs GD (f64) | vs flow (f64) | s |",
           "|---|---|---|---|---|"]
    for m, r in check["methods"].items():
        if r["status"] != "ok":
            out.append(f"| {m} | {r['status']} | | | |")
            continue
        out.append(f"| {m} | {r['rel_vs_maml_unrolled']:.2e} | {r['rel_vs_gd_f64']:.2e} | "
                   f"{r['rel_vs_flow_f64']:.2e} | {r['seconds']:.3f} |")
    for name, r in check.get("checkpoint_vs_store", {}).items():
        out.append(f"\n{name}: {'bit-identical' if r['bit_identical'] else 'NOT bit-identical'} "
                   f"(relative difference {r['rel']:.2e})")
    return "\n".join(out)
