#!/usr/bin/env python
"""Time and peak memory of ONE meta-gradient against the number of inner steps K.

    python benchmarks/bench_meta_grad.py --model cosmixture --out meta_grad_cosmixture.json
    python benchmarks/bench_meta_grad.py --model conv4 --channels 8 --ks 10,50 --repeats 1
    python benchmarks/bench_meta_grad.py --methods ours_store,maml_unrolled --ks 10,100 --timeout 60

Every method computes ``d V(u_K) / d theta``, the gradient of the query loss V after K inner
gradient-descent / gradient-flow steps of step h on the support loss L (default h = 0.01, so
``T = K h``), starting from the model's parameters theta. Models and tasks:
``benchmarks/meta_grad_models.py`` (``cosmixture``: the paper's MLP 2-32-32-1 tanh on one
CosMixture task with 100 support + 100 query points; ``conv4``: 4 x [conv3x3, BatchNorm2d
(training mode), ReLU, MaxPool2d] + Linear on one 20-way 1-shot task of random 28x28 images,
support 20 images, query ``--query-shots`` (default 1) images per class, cross-entropy).

Methods:

* ``ours_store``: ``amaml_ext.adjoint_meta_grad`` with its defaults: dopri5 forward (rtol/atol
  ``--rtol/--atol``, default = the function's defaults 1e-6/1e-8) storing the K+1 grid states,
  Heun adjoint with HVPs.
* ``ours_exact``: ``solver="euler", adjoint="discrete"``: the exact gradient of K GD steps.
* ``ours_checkpoint``: the same with ``memory="checkpoint"`` (about 2 sqrt(K) stored states).
* ``ours_dopri5_ckpt``: the default solver and adjoint with ``memory="checkpoint"`` (reported
  n/a where that combination raises NotImplementedError, as amaml_ext did before 3d5141e).
* ``ours_store_compiled``, ``ours_exact_compiled``: ``ours_store`` and ``ours_exact`` with
  ``compile=True`` (``torch.compile``-d ``torch.func`` gradient and forward-over-reverse HVP).
  The one-off compilation (seconds, ``compile_s`` in the JSON) is done by a K = 1 call before
  the baseline, so neither the time nor the peak memory includes it; a fallback to eager is
  reported as an error.
* ``maml_unrolled``: autograd through K GD steps with ``create_graph=True``
  (``torch.func.functional_call`` with the parameters as views of a flat vector).
* ``authors_rk4``: the authors' approach: ``torchdiffeq.odeint(method="rk4")`` on the fixed
  grid ``linspace(0, T, K+1)`` for the forward gradient flow, then the adjoint solved backward
  by Heun (the paper's "modified Euler") with the Hessian formed densely at every stored state by
  ``torch.autograd.functional.jacobian`` of the gradient (K+1 Hessians, O(d^2) memory and d
  backward passes each): MLP only.
* ``authors_heun``: the same rk4 forward, then a Python Heun loop backward over the stored
  states with ``torch.autograd.functional.vhp`` (2K vhp calls, each re-running the forward and
  double backward; one task at a time).
* ``odeint_adjoint``: ``torchdiffeq.odeint_adjoint`` (dopri5, same rtol/atol, back-solve of
  the state with the adjoint) of the gradient flow with the parameters as the ODE state; the
  meta-gradient is the gradient with respect to the initial state.

Meta-batch (``--tasks B``, default 1): B tasks (seeds ``seed+1 .. seed+B``) per meta-gradient,
the result ``[B, d]``. Ours computes them together (``batched=True``: vmap, ``[B, d]`` kernels),
``maml_unrolled`` too (vmap over the tasks, one graph), ``odeint_adjoint`` solves the ``[B, d]``
state, and ``authors_*`` loop over the tasks one at a time, as the authors' code does.

Measurements. Each (method, K) point runs in a fresh subprocess (this script re-invoked with
``--single METHOD K``): build the model and task, evaluate the support loss's gradient and one
HVP once (library warm-up), ``gc.collect()`` and ``malloc_trim(0)``, read the baseline, then one
warm-up meta-gradient and up to ``--repeats`` timed ones (fewer if they would not fit in
``--timeout``; with none left the warm-up time is reported and marked ``*``). Time: median of
the timed runs (CUDA: synchronised). Peak memory, CPU: the peak resident set above the
baseline's resident set. On Linux the kernel's high-water mark is reset at the baseline
(``echo 5 > /proc/self/clear_refs``) and read back as ``VmHWM``: ``getrusage(RUSAGE_SELF)
.ru_maxrss`` cannot be used as is, because a child started by fork/vfork + exec inherits the
parent's high-water mark (here: the parent holds torch and the correctness check, hundreds of
MiB, above anything the MLP needs), so ``ru_maxrss(after) - ru_maxrss(baseline)`` reads 0 for
small runs. That difference is still recorded (``peak_maxrss_bytes``) and is the fallback where
``clear_refs`` is unavailable. CUDA: ``torch.cuda.max_memory_allocated()`` above the bytes
allocated at the baseline (peak stats reset there). The parent kills a point that runs past
``--timeout`` seconds (after set-up) or whose resident memory passes ``--mem-limit`` GiB, marks
it, and skips the larger K of that method (also when the previous point's time x K/K_prev
exceeds the time-out: "predicted", unless ``--no-predict``).

Threads: on a shared, loaded machine use ``--threads 1``: with 2+ OpenMP threads and other
processes on the cores, every parallel region can wait a scheduler slice (seen here: a 0.6 ms
MLP gradient took 104 ms with 2 threads under load 5).

Floor (ours only): the same numbers of gradient evaluations, linearisations and HVPs as
``MetaGradResult.stats`` reports, priced at single calls of
``amaml_ext.functional.TaskFunctions`` timed in the same subprocess:
``floor = grad_evals * t_grad + linearisations * t_hvp_new + (hvps - linearisations) * t_hvp_reuse``
(``t_hvp_new``: an HVP at a new state, which builds the gradient graph; ``t_hvp_reuse``: another
HVP at the same state). ``total/floor`` is the method's overhead over its own derivative calls.

Correctness (unless ``--no-check``), once at ``--check-k`` (default 10) in this process, each
method under ``--timeout`` (SIGALRM): every selected method's gradient against
``maml_unrolled`` in the same dtype (``ours_exact`` should match to ~1e-6 in float32), against
unrolled GD in float64 and against a float64 gradient-flow reference (``adjoint_meta_grad``
rk4/rk4 on a grid h/8) of the same problem; and whether each checkpoint mode is bit-identical
to its store mode. A method that times out or fails there is not run at the larger K (when
``--check-k`` is at most the smallest K).

Note: on Conv4 (ReLU, max-pool: a non-smooth right-hand side) the dopri5 methods at the
default rtol/atol = 1e-6/1e-8 take steps of about 3e-5 (thousands of steps for T = 0.1) and
time out; ``--rtol 1e-3 --atol 1e-5`` makes them run. ``odeint_adjoint`` back-solves the state
through the time-reversed gradient flow, which is unstable: at larger T its backward pass needs
tens of thousands of evaluations (e.g. CosMixture, K = 200: 116 forward, ~23,000 backward).

Output: a markdown table on stdout, JSON with everything to ``--out``.
"""

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import queue
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

import amaml_ext  # noqa: E402
from amaml_ext import adjoint_meta_grad, unflatten_params  # noqa: E402

import meta_grad_models as mgm  # noqa: E402

try:  # imported here, before any baseline: its import is not part of a method's memory
    import torchdiffeq  # noqa: E402
except ImportError:  # the torchdiffeq methods then report the error
    torchdiffeq = None

DEFAULT_KS = [10, 50, 200, 500, 1000, 2000]
ALL_METHODS = ["ours_store", "ours_exact", "ours_checkpoint", "ours_dopri5_ckpt", "ours_store_compiled",
               "ours_exact_compiled", "maml_unrolled", "authors_rk4", "authors_heun", "odeint_adjoint"]
OURS = {"ours_store", "ours_exact", "ours_checkpoint", "ours_dopri5_ckpt", "ours_store_compiled",
        "ours_exact_compiled"}
COMPILED = {"ours_store_compiled", "ours_exact_compiled"}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ---- problem -----------------------------------------------------------------------------------

class Problem:
    """A setting plus the functional losses the autograd baselines use."""

    def __init__(self, setting: mgm.Setting, h: float, rtol: float, atol: float,
                 jacobian_vectorize: bool = False):
        self.s = setting
        self.h = h
        self.rtol, self.atol = rtol, atol
        self.jacobian_vectorize = jacobian_vectorize
        self.module = mgm.stateless_copy(setting.model)
        self.tasks = int(setting.info.get("tasks", 1))
        self.batched = self.tasks > 1

    @property
    def u0(self) -> torch.Tensor:
        """The initial state: theta ``[d]``, or ``[B, d]`` (theta per task) for a meta-batch."""
        th = self.s.theta.detach()
        return th.expand(self.tasks, -1).clone() if self.batched else th.clone()

    def _task_loss(self, u: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pred = torch.func.functional_call(self.module, unflatten_params(self.s.model, u), (x,))
        return self.s.loss(pred, y)

    def loss_at(self, u: torch.Tensor, data) -> torch.Tensor:
        """The loss at ``u``; for a meta-batch the sum of the per-task losses (vmap), whose
        gradient with respect to ``u[b]`` is task b's gradient."""
        x, y = data
        if self.batched:
            return torch.func.vmap(self._task_loss)(u, x, y).sum()
        return self._task_loss(u, x, y)

    def task(self, b: int) -> "Problem":
        """Task b of a meta-batch as a one-task problem (for the one-task-at-a-time baselines)."""
        s = self.s
        pick = lambda pair: tuple(t[b] for t in pair)  # noqa: E731
        setting = mgm.Setting(s.name, s.model, s.loss, s.theta, pick(s.support), pick(s.query),
                              dict(s.info, tasks=1))
        return Problem(setting, self.h, self.rtol, self.atol, self.jacobian_vectorize)

    def train_loss(self, u):
        return self.loss_at(u, self.s.support)

    def val_grad(self, u: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            leaf = u.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.loss_at(leaf, self.s.query), leaf)
        return g

    def T(self, K: int) -> float:
        return K * self.h

    def to(self, dtype) -> "Problem":
        """The same problem in another dtype (model, theta and data cast)."""
        s = self.s
        cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
        model = copy.deepcopy(s.model).to(dtype)
        setting = mgm.Setting(s.name, model, s.loss, s.theta.to(dtype), tuple(map(cast, s.support)),
                              tuple(map(cast, s.query)), dict(s.info))
        return Problem(setting, self.h, self.rtol, self.atol, self.jacobian_vectorize)


class GradFlow(torch.nn.Module):
    """du/dt = -grad L(u) as a torchdiffeq right-hand side (no parameters: the task data are
    constants). With ``u`` requiring grad (inside odeint_adjoint's backward pass), the
    gradient is built with its graph, so that torchdiffeq's VJP is an HVP."""

    def __init__(self, problem: Problem):
        super().__init__()
        self.p = problem
        self.nfe = 0

    def forward(self, t, u):
        self.nfe += 1
        with torch.enable_grad():
            create = u.requires_grad
            leaf = u if create else u.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.p.train_loss(leaf), leaf, create_graph=create)
        return -g


# ---- methods -----------------------------------------------------------------------------------

def _ours(solver, adjoint, memory, tolerances=False, compile=False):
    def run(p: Problem, K: int):
        kw = dict(rtol=p.rtol, atol=p.atol) if tolerances else {}
        r = adjoint_meta_grad(p.s.model, p.s.loss, p.s.theta, p.T(K), support=p.s.support, query=p.s.query,
                              h=p.h, solver=solver, adjoint=adjoint, memory=memory, compile=compile,
                              batched=p.batched, **kw)
        if compile and not r.stats["compiled"]:
            raise RuntimeError("torch.compile of the callbacks failed (amaml_ext fell back to eager)")
        return r.grad, dict(r.stats)
    return run


def maml_unrolled(p: Problem, K: int):
    th = p.u0.requires_grad_(True)
    u = th
    with torch.enable_grad():
        for _ in range(K):
            (g,) = torch.autograd.grad(p.train_loss(u), u, create_graph=True)
            u = u - p.h * g
        val = p.loss_at(u, p.s.query)
        (grad,) = torch.autograd.grad(val, th)
    return grad, {"grad_evals": K + 1}


def _rk4_trajectory(p: Problem, K: int):
    if torchdiffeq is None:
        raise ImportError("torchdiffeq is not installed")
    flow = GradFlow(p)
    t = torch.linspace(0.0, p.T(K), K + 1, dtype=p.s.theta.dtype, device=p.s.theta.device)
    with torch.no_grad():
        states = torchdiffeq.odeint(flow, p.u0, t, method="rk4")
    return states, flow.nfe


def _one_task_at_a_time(method):
    """The authors' code meta-differentiates one task at a time: loop over a meta-batch."""
    def run(p: Problem, K: int):
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
def authors_rk4(p: Problem, K: int):
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
def authors_heun(p: Problem, K: int):
    states, nfe = _rk4_trajectory(p, K)
    h = p.h
    vhp = torch.autograd.functional.vhp
    lam = p.val_grad(states[-1])
    for j in range(K, 0, -1):
        k1 = vhp(p.train_loss, states[j], lam)[1]
        k2 = vhp(p.train_loss, states[j - 1], lam - h * k1)[1]
        lam = lam - 0.5 * h * (k1 + k2)
    return lam, {"grad_evals": nfe + 1, "hvps": 2 * K}


def odeint_adjoint(p: Problem, K: int):
    if torchdiffeq is None:
        raise ImportError("torchdiffeq is not installed")
    flow = GradFlow(p)
    y0 = p.u0.requires_grad_(True)
    t = torch.tensor([0.0, p.T(K)], dtype=y0.dtype, device=y0.device)
    ys = torchdiffeq.odeint_adjoint(flow, y0, t, method="dopri5", rtol=p.rtol, atol=p.atol, adjoint_params=())
    nfe_forward = flow.nfe
    with torch.enable_grad():
        val = p.loss_at(ys[-1], p.s.query)
        (grad,) = torch.autograd.grad(val, y0)
    return grad, {"nfe_forward": nfe_forward, "nfe_backward": flow.nfe - nfe_forward}


METHODS: Dict[str, Callable] = {
    "ours_store": _ours("dopri5", "heun", "store", tolerances=True),
    "ours_exact": _ours("euler", "discrete", "store"),
    "ours_checkpoint": _ours("euler", "discrete", "checkpoint"),
    "ours_dopri5_ckpt": _ours("dopri5", "heun", "checkpoint", tolerances=True),
    "ours_store_compiled": _ours("dopri5", "heun", "store", tolerances=True, compile=True),
    "ours_exact_compiled": _ours("euler", "discrete", "store", compile=True),
    "maml_unrolled": maml_unrolled,
    "authors_rk4": authors_rk4,
    "authors_heun": authors_heun,
    "odeint_adjoint": odeint_adjoint,
}


def not_applicable(method: str, setting: mgm.Setting) -> Optional[str]:
    if method == "authors_rk4" and setting.name != "cosmixture":
        return f"n/a: dense d x d Hessians (d = {setting.d}), MLP only"
    return None


# ---- timing helpers ----------------------------------------------------------------------------

def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_call_time(fn, device, budget_s=0.5, min_calls=5, max_calls=50) -> float:
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    n = int(max(min_calls, min(max_calls, budget_s / max(first, 1e-9))))
    ts = [first]
    for _ in range(n - 1):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def unit_costs(p: Problem, device, compile: bool = False) -> Dict[str, float]:
    """Seconds per TaskFunctions call: grad, HVP at a new state, HVP reusing the state (with
    ``compile``: the compiled callbacks, whose HVPs do not reuse a state: new = reuse)."""
    from amaml_ext.functional import TaskFunctions
    fns = TaskFunctions(p.s.model, p.s.loss, p.s.support, p.s.query, p.batched, compile=compile)
    u = p.u0
    v = torch.randn_like(u)
    try:
        t_grad = median_call_time(lambda: fns.grad(u), device)
        t_new = median_call_time(lambda: fns.hvp(u, v, key=object()), device)
        fns.hvp(u, v, key="same")
        t_reuse = median_call_time(lambda: fns.hvp(u, v, key="same"), device)
    finally:
        fns.release()
    return {"t_grad": t_grad, "t_hvp_new": t_new, "t_hvp_reuse": t_reuse}


def floor_seconds(stats: Dict, costs: Dict[str, float]) -> Optional[float]:
    try:
        g, hv, lin = int(stats["grad_evals"]), int(stats["hvps"]), int(stats["linearisations"])
    except (KeyError, TypeError, ValueError):
        return None
    return g * costs["t_grad"] + lin * costs["t_hvp_new"] + (hv - lin) * costs["t_hvp_reuse"]


def maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _proc_status_bytes(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux: ``echo 5 > /proc/self/clear_refs``); True if done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_bytes("VmHWM") is not None
    except OSError:
        return False


def trim_heap() -> None:
    """Give free malloc memory back to the OS, so the baseline RSS holds no reusable slack."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _jsonable(stats: Dict) -> Dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in stats.items()}


# ---- one point (child process) -----------------------------------------------------------------

def build_problem(args, dtype=None) -> Problem:
    setting = mgm.build(args.model, dtype=dtype or DTYPES[args.dtype], device=args.device, seed=args.seed,
                        channels=args.channels, query_shots=args.query_shots, tasks=args.tasks)
    return Problem(setting, args.h, args.rtol, args.atol, args.jacobian_vectorize)


def run_single(args) -> Dict:
    method, K = args.single[0], int(args.single[1])
    device = args.device
    p = build_problem(args)
    # library warm-up: one gradient and one HVP of the support loss
    with torch.enable_grad():
        leaf = p.u0.requires_grad_(True)
        (g,) = torch.autograd.grad(p.train_loss(leaf), leaf, create_graph=True)
        torch.autograd.grad(g, leaf, torch.ones_like(g))
    del leaf, g
    fn = METHODS[method]
    compile_s = None
    if method in COMPILED:  # compile outside the measurement (inductor's own memory included)
        t0 = time.perf_counter()
        try:
            fn(p, 1)
        except Exception as e:  # noqa: BLE001
            return {"method": method, "K": K, "status": "error", "error": f"{type(e).__name__}: {str(e)[:300]}"}
        compile_s = time.perf_counter() - t0
    gc.collect()
    trim_heap()
    sync(device)
    is_cuda = torch.device(device).type == "cuda"
    base_maxrss = maxrss_bytes()
    hwm_reset = False
    if is_cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        hwm_reset = reset_peak_rss()
        base = _proc_status_bytes("VmRSS") if hwm_reset else base_maxrss
    print("READY", flush=True)
    start = time.perf_counter()
    out: Dict = {"method": method, "K": K}
    if compile_s is not None:
        out["compile_s"] = compile_s
    try:
        t0 = time.perf_counter()
        grad, stats = fn(p, K)
        sync(device)
        warm = time.perf_counter() - t0
        if not bool(torch.isfinite(grad).all()):
            raise FloatingPointError("non-finite meta-gradient")
        del grad
        left = args.timeout - (time.perf_counter() - start)
        n = min(args.repeats, int(left / warm) if warm > 0 else args.repeats)
        times = []
        for _ in range(max(n, 0)):
            t0 = time.perf_counter()
            grad, stats = fn(p, K)
            sync(device)
            times.append(time.perf_counter() - t0)
            del grad
        if is_cuda:
            peak, how = torch.cuda.max_memory_allocated() - base, "cuda.max_memory_allocated"
        elif hwm_reset:
            peak, how = _proc_status_bytes("VmHWM") - base, "VmHWM (reset at baseline) - VmRSS at baseline"
        else:
            peak, how = maxrss_bytes() - base, "ru_maxrss - baseline ru_maxrss"
        out.update(status="ok", time_s=statistics.median(times) if times else warm, warmup_s=warm,
                   times_s=times, warmup_only=not times, peak_bytes=int(peak), peak_method=how,
                   peak_maxrss_bytes=int(maxrss_bytes() - base_maxrss), baseline_bytes=int(base),
                   stats=_jsonable(stats))
    except NotImplementedError as e:
        out.update(status="n/a", error=f"NotImplementedError: {e}")
        return out
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        out.update(status="oom", error=f"{type(e).__name__}: {str(e)[:300]}")
        return out
    except Exception as e:  # noqa: BLE001  (a benchmark reports failures, it does not stop on them)
        out.update(status="error", error=f"{type(e).__name__}: {str(e)[:300]}")
        return out
    if method in OURS:
        try:
            costs = unit_costs(p, device, compile=method in COMPILED)
            out["unit_costs"] = costs
            fl = floor_seconds(out["stats"], costs)
            if fl:
                out["floor_s"] = fl
                out["total_over_floor"] = out["time_s"] / fl
        except Exception as e:  # noqa: BLE001
            out["floor_error"] = f"{type(e).__name__}: {e}"
    return out


# ---- parent: launch points -----------------------------------------------------------------------

def child_command(args, method: str, K: int) -> List[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--single", method, str(K),
           "--model", args.model, "--device", args.device, "--dtype", args.dtype, "--h", repr(args.h),
           "--repeats", str(args.repeats), "--timeout", repr(args.timeout), "--channels", str(args.channels),
           "--query-shots", str(args.query_shots), "--seed", str(args.seed), "--rtol", repr(args.rtol),
           "--atol", repr(args.atol), "--tasks", str(args.tasks)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.jacobian_vectorize:
        cmd.append("--jacobian-vectorize")
    return cmd


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_point(args, method: str, K: int) -> Dict:
    proc = subprocess.Popen(child_command(args, method, K), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines: "queue.Queue[Optional[str]]" = queue.Queue()
    err_tail: List[str] = []

    def pump_out():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def pump_err():
        for line in proc.stderr:
            err_tail.append(line)
            del err_tail[:-20]

    threads = [threading.Thread(target=pump_out, daemon=True), threading.Thread(target=pump_err, daemon=True)]
    for t in threads:
        t.start()
    launched = time.perf_counter()
    ready_at = None
    result = None
    mem_limit = args.mem_limit * (1 << 30)
    killed = None
    while True:
        try:
            line = lines.get(timeout=0.05)
        except queue.Empty:
            line = ""
        if line is None:
            break
        if line.startswith("READY"):
            ready_at = time.perf_counter()
        elif line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        now = time.perf_counter()
        if killed is None:
            if ready_at is None and now - launched > args.setup_timeout:
                killed = "error: set-up time-out"
            elif ready_at is not None and now - ready_at > args.timeout:
                killed = "timeout"
            elif torch.device(args.device).type == "cpu" and _rss_bytes(proc.pid) > mem_limit:
                killed = f"oom: resident memory > --mem-limit {args.mem_limit:g} GiB"
            if killed is not None:
                proc.kill()
    proc.wait()
    for t in threads:
        t.join(timeout=5)
    if result is not None:
        return result
    if killed is not None:
        return {"method": method, "K": K, "status": killed.split(":")[0], "error": killed,
                "elapsed_s": time.perf_counter() - (ready_at or launched)}
    tail = "".join(err_tail).strip().splitlines()[-3:]
    return {"method": method, "K": K, "status": "error",
            "error": f"child exited with {proc.returncode}: " + " | ".join(tail)}


# ---- correctness check -------------------------------------------------------------------------

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
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


def correctness_check(args, methods: List[str]) -> Dict:
    K = args.check_k
    p = build_problem(args)
    p64 = p.to(torch.float64)
    ref_gd, _ = maml_unrolled(p64, K)
    fine = 8
    ref_flow = adjoint_meta_grad(p64.s.model, p64.s.loss, p64.s.theta, p64.T(K), support=p64.s.support,
                                 query=p64.s.query, h=p.h / fine, solver="rk4", adjoint="rk4",
                                 batched=p64.batched).grad
    rows = {}
    grads = {}
    for m in methods:
        why = not_applicable(m, p.s)
        if why:
            rows[m] = {"status": why}
            continue
        t0 = time.perf_counter()
        try:
            with time_limit(args.timeout):
                g, _ = METHODS[m](p, K)
        except NotImplementedError as e:
            rows[m] = {"status": f"n/a: NotImplementedError: {e}"}
            continue
        except CheckTimeout as e:
            rows[m] = {"status": f"timeout: over {args.timeout:g} s"}
            continue
        except Exception as e:  # noqa: BLE001
            rows[m] = {"status": f"error: {type(e).__name__}: {str(e)[:200]}"}
            continue
        grads[m] = g
        rows[m] = {"status": "ok", "seconds": time.perf_counter() - t0, "rel_vs_gd_f64": rel(g, ref_gd),
                   "rel_vs_flow_f64": rel(g, ref_flow)}
    if "maml_unrolled" not in grads:
        grads["maml_unrolled"], _ = maml_unrolled(p, K)
    for m, g in grads.items():
        if m in rows:
            rows[m]["rel_vs_maml_unrolled"] = rel(g, grads["maml_unrolled"])
    pairs = {}
    for ck, st in (("ours_checkpoint", "ours_exact"), ("ours_dopri5_ckpt", "ours_store")):
        if ck in grads and st in grads:
            pairs[f"{ck} vs {st}"] = {"bit_identical": bool(torch.equal(grads[ck], grads[st])),
                                      "rel": rel(grads[ck], grads[st])}
    return {"K": K, "dtype": args.dtype, "flow_reference": f"float64 rk4/rk4 h/{fine}",
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


# ---- table -------------------------------------------------------------------------------------

def _fmt_time(r):
    if r.get("status") != "ok":
        return ""
    s = f"{r['time_s']:.4g}"
    return s + ("*" if r.get("warmup_only") else "")


def _fmt_mem(r):
    if r.get("status") != "ok" or r.get("peak_bytes") is None:
        return ""
    return f"{r['peak_bytes'] / 2**20:.1f}"


def results_table(points: List[Dict]) -> str:
    out = ["| method | K | time (s) | peak mem (MiB) | grad evals | HVPs | linearisations | stored states (MiB) "
           "| floor (s) | total/floor | status |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in points:
        st = r.get("stats") or {}
        traj = st.get("trajectory_bytes")
        evals = st.get("grad_evals", "")
        if "nfe_forward" in st:
            evals = f"{st['nfe_forward']} fwd + {st['nfe_backward']} bwd NFE"
        hv = st.get("hvps", st.get("hessians", ""))
        if "hessians" in st:
            hv = f"{st['hessians']} dense Hessians"
        status = r.get("status", "")
        if status != "ok":
            status = r.get("error", status)
        elif st.get("rejected_steps"):
            status = f"ok ({st.get('accepted_steps')} acc. / {st.get('rejected_steps')} rej. dopri5 steps)"
        elif st.get("accepted_steps") is not None and st.get("solver") == "dopri5":
            status = f"ok ({st.get('accepted_steps')} dopri5 steps)"
        status = status.replace("|", "/")
        out.append(" | ".join([
            f"| {r['method']}", str(r["K"]), _fmt_time(r), _fmt_mem(r), str(evals), str(hv),
            str(st.get("linearisations", "")), f"{traj / 2**20:.2f}" if traj is not None else "",
            f"{r['floor_s']:.4g}" if r.get("floor_s") else "",
            f"{r['total_over_floor']:.2f}" if r.get("total_over_floor") else "", status]) + " |")
    return "\n".join(out)


# ---- main --------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=mgm.MODELS, default="cosmixture")
    ap.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="inner steps K, comma-separated")
    ap.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma-separated subset of {ALL_METHODS}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--h", type=float, default=0.01, help="inner step / grid spacing; T = K h")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per point after set-up")
    ap.add_argument("--setup-timeout", type=float, default=180.0, help="seconds for a child's imports and set-up")
    ap.add_argument("--mem-limit", type=float, default=None,
                    help="GiB of resident memory per point (CPU; default: half of MemAvailable)")
    ap.add_argument("--no-predict", action="store_true",
                    help="do not skip a K whose time, extrapolated linearly from the previous K, exceeds --timeout")
    ap.add_argument("--channels", type=int, default=64, help="Conv4 width")
    ap.add_argument("--query-shots", type=int, default=1, help="Conv4 query images per class (1 or 5)")
    ap.add_argument("--rtol", type=float, default=1e-6, help="dopri5 rtol (ours_store, odeint_adjoint)")
    ap.add_argument("--atol", type=float, default=1e-8, help="dopri5 atol (ours_store, odeint_adjoint)")
    ap.add_argument("--jacobian-vectorize", action="store_true",
                    help="authors_rk4: torch.autograd.functional.jacobian(vectorize=True) (default: False, as written)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", type=int, default=1,
                    help="tasks per meta-gradient (a meta-batch): ours and maml_unrolled batch them "
                         "(vmap), authors_* loop over them one task at a time, odeint_adjoint solves "
                         "the [B, d] state")
    ap.add_argument("--check-k", type=int, default=10)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument("--single", nargs=2, metavar=("METHOD", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {ALL_METHODS}")
    if args.mem_limit is None:
        avail = 0
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        avail = int(line.split()[1]) * 1024
        except OSError:
            pass
        args.mem_limit = (avail / 2 / 2**30) if avail else 8.0
    return args


def machine_info(args) -> Dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": args.threads or torch.get_num_threads(),
            "device": args.device}
    try:
        info["amaml_ext"] = amaml_ext.build_info()
    except Exception as e:  # noqa: BLE001
        info["amaml_ext"] = f"unavailable: {e}"
    info["torchdiffeq"] = getattr(torchdiffeq, "__version__", None)
    if torch.device(args.device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.single:
        print("RESULT " + json.dumps(run_single(args)), flush=True)
        return 0

    setting = build_problem(args).s
    info = setting.info
    header = (f"Meta-gradient vs inner steps K: {info['model']}, {info['task']}, support {info['support']}, "
              f"query {info['query']}, d = {setting.d}, {info['tasks']} task(s) per meta-gradient; "
              f"{args.device}, {args.dtype}, "
              f"{args.threads or torch.get_num_threads()} threads; h = {args.h:g}, T = K h")
    print(header, flush=True)

    check = None
    if not args.no_check:
        check = correctness_check(args, args.methods)
        print("\n" + check_table(check) + "\n", flush=True)
        oe = check["methods"].get("ours_exact", {})
        if "rel_vs_maml_unrolled" in oe:
            print(f"ours_exact vs maml_unrolled at K = {check['K']} ({args.dtype}): "
                  f"relative error {oe['rel_vs_maml_unrolled']:.2e}\n", flush=True)

    points = []
    for m in args.methods:
        why = not_applicable(m, setting)
        stop, last = None, None
        failed = (check or {}).get("methods", {}).get(m, {}).get("status", "ok")
        if failed.startswith(("timeout", "error")) and args.check_k <= min(args.ks):
            stop = f"skipped: {failed.split(':')[0]} in the correctness check at K={args.check_k}"
        for K in args.ks:
            if why:
                r = {"method": m, "K": K, "status": "n/a", "error": why}
            elif stop:
                r = {"method": m, "K": K, "status": "skipped", "error": stop}
            elif (last is not None and not args.no_predict
                  and last["time_s"] * K / last["K"] > args.timeout):
                r = {"method": m, "K": K, "status": "skipped",
                     "error": f"skipped: predicted {last['time_s'] * K / last['K']:.0f} s > time-out"}
            else:
                t0 = time.perf_counter()
                r = run_point(args, m, K)
                r["wall_s"] = time.perf_counter() - t0
            print(f"  {m:17s} K={K:<5d} {r['status']:8s} "
                  + (f"{r['time_s']:.4g} s, {r['peak_bytes'] / 2**20:.1f} MiB" if r["status"] == "ok"
                     else r.get("error", "")), file=sys.stderr, flush=True)
            points.append(r)
            if r["status"] == "ok":
                last = r
            elif r["status"] == "n/a":
                why = r.get("error", "n/a")
            elif r["status"] in ("timeout", "error", "oom") and stop is None:
                stop = f"skipped: {r['status']} at K={K}"
            elif r["status"] == "skipped" and stop is None:
                stop = r["error"]
    print(results_table(points))
    costs = [r["unit_costs"] for r in points if r.get("unit_costs")]
    if costs:
        med = {k: statistics.median(c[k] for c in costs) for k in costs[0]}
        print(f"\nUnit costs (median over the ours points): grad {med['t_grad'] * 1e3:.3f} ms, "
              f"HVP at a new state {med['t_hvp_new'] * 1e3:.3f} ms, HVP reusing the state "
              f"{med['t_hvp_reuse'] * 1e3:.3f} ms. Times: median of up to {args.repeats} runs after a warm-up "
              f"(* = warm-up only).")
    hows = sorted({r["peak_method"] for r in points if r.get("peak_method")})
    if hows:
        print(f"Peak memory: {'; '.join(hows)}.")
    if args.out:
        doc = {"config": {k: v for k, v in vars(args).items() if k != "single"}, "setting": info,
               "machine": machine_info(args), "check": check, "points": points}
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
