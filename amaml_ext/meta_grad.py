"""adjoint_meta_grad: the A-MAML meta-gradient of a long inner training run.

Inner training is the gradient flow ``du/dt = -grad L(u)``, ``u(0) = theta``; the meta-loss
is the validation loss ``V(u(T))``. Forward: :func:`amaml_ext.ode.solve_forward` stores
``u`` on the grid ``t_j = j h``. Backward: the adjoint ``dlam/dt = Hess L(u(t)) lam``,
``lam(T) = grad V(u(T))``, solved by :func:`amaml_ext.ode.solve_adjoint` with
Hessian-vector products; ``dJ/dtheta = lam(0)``. No autograd graph spans the run.

``solver="euler", adjoint="discrete"`` is the exact gradient of ``K = T / h`` plain
gradient-descent steps with step size h, which is what MAML computes by unrolling.
"""

import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn

from . import _C, accuracy, ode
from .accuracy import AdjointAccuracyError, AdjointAccuracyWarning
from .functional import TaskFunctions, param_shapes

MEMORY_MODES = ("store", "checkpoint", "auto")


@dataclass
class MetaGradResult:
    """Result of :func:`adjoint_meta_grad`.

    Attributes:
        grad: meta-gradient ``dV(u(T))/dtheta``: ``[d]``, or ``[B, d]`` (per task) when batched.
        loss: validation loss at ``u(T)``: ``[]``, or ``[B]`` when batched.
        params: adapted parameters ``u(T)``: ``[d]`` or ``[B, d]``.
        stats: ``grad_evals``, ``hvps``, ``linearisations``, ``accepted_steps``,
            ``rejected_steps``, ``grid_steps`` (N), ``trajectory_bytes`` (stored states at the
            peak), ``memory`` (mode used), ``solver``, ``adjoint``; for a continuous adjoint
            with the estimate on: ``adjoint_error_estimate`` (relative error of the gradient,
            max over tasks), ``invariant_drift``, ``richardson_estimate`` (with
            ``error_estimate="richardson"``), ``h_lambda_max`` (computed when the estimate
            exceeds the tolerance, else None), ``nonsmooth_modules``, ``error_tol`` and
            ``h`` (the grid used; differs from the argument after ``refine``).
            See :mod:`amaml_ext.accuracy`.
    """

    grad: torch.Tensor
    loss: torch.Tensor
    params: torch.Tensor
    stats: Dict[str, Any] = field(default_factory=dict)


def _check_pair(name: str, pair, batched: bool):
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, torch.Tensor) for t in pair)):
        raise TypeError(f"argument '{name}' must be a pair (x, y) of tensors, got {type(pair).__name__}")
    x, y = pair
    if batched:
        if x.dim() < 2 or y.dim() < 1:
            raise ValueError(f"argument '{name}' must have a leading task dimension with batched=True, "
                             f"got x {tuple(x.shape)}, y {tuple(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"argument '{name}': x and y must have the same number of tasks, "
                             f"got {x.shape[0]} and {y.shape[0]}")
    sample_dim = 1 if batched else 0
    if x.dim() <= sample_dim or y.dim() <= sample_dim:
        raise ValueError(f"argument '{name}': x and y need a sample dimension, got x {tuple(x.shape)}, y {tuple(y.shape)}"
                         + (" (with batched=True: [tasks, samples, ...])" if batched else ""))
    if x.shape[sample_dim] != y.shape[sample_dim]:
        layout = (" (with batched=True dimension 0 indexes tasks and dimension 1 samples: is the data "
                  "batched?)" if batched else "")
        raise ValueError(f"argument '{name}': x and y must have the same number of samples, "
                         f"got {x.shape[sample_dim]} and {y.shape[sample_dim]}{layout}")
    return x, y


def _horizons(T, h: float, batched: bool, batch: int) -> Tuple[float, Optional[torch.Tensor]]:
    """T_max and, for per-task horizons, a [B] float64 tensor of T_b (validated)."""
    if isinstance(T, torch.Tensor) and T.numel() > 1:
        if not batched:
            raise ValueError(f"argument 'T' must be a number unless batched=True, got a tensor of shape {tuple(T.shape)}")
        if T.shape != (batch,):
            raise ValueError(f"argument 'T' must be a number or a tensor of shape [B] = [{batch}], got {tuple(T.shape)}")
        Tv = T.detach().to("cpu", torch.float64)
        if T.dtype != torch.float64:
            # a float32 (or lower) horizon is the nearest representable value: snap it to the grid
            # when it is within that precision of a whole number of steps
            steps = torch.round(Tv / h)
            close = (steps * h - Tv).abs() <= 4 * torch.finfo(T.dtype).eps * Tv.abs().clamp_min(1.0)
            Tv = torch.where(close & (steps >= 1), steps * h, Tv)
        if not bool(torch.isfinite(Tv).all()) or bool((Tv <= 0).any()):
            raise ValueError(f"argument 'T' must be finite and > 0 for every task, got {Tv.tolist()}")
        for b, tb in enumerate(Tv.tolist()):
            try:
                ode.grid_size(tb, h)
            except ValueError as e:
                raise ValueError(f"argument 'T' (task {b}): {e}") from None
        T_max = float(Tv.max())
        return T_max, (Tv if bool((Tv < T_max).any()) else None)
    if isinstance(T, torch.Tensor):
        if T.numel() != 1:
            raise ValueError(f"argument 'T' must be a number or a tensor [B], got a tensor of shape {tuple(T.shape)}")
        low = T.dtype != torch.float64 and T.is_floating_point()
        T = T.item()
        if low and isinstance(h, float) and h > 0 and round(T / h) >= 1 and abs(round(T / h) * h - T) <= 1e-6 * max(1.0, abs(T)):
            T = round(T / h) * h
    if isinstance(T, bool) or not isinstance(T, numbers.Real):
        raise TypeError(f"argument 'T' must be a number or a tensor [B], got {type(T).__name__}")
    return float(T), None


def _check_solver_options(rtol, atol, max_steps, memory_budget) -> None:
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not 0 < v < 1:
            raise ValueError(f"argument '{name}' must be a number in (0, 1) (dopri5's tolerance), got {v!r}")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral)
                                  or max_steps < 1):
        raise ValueError(f"argument 'max_steps' must be a positive int (or None for the default), got {max_steps!r}")
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, numbers.Real)
                                      or not memory_budget >= 0):
        raise ValueError(f"argument 'memory_budget' must be a number of bytes >= 0 (or None), got {memory_budget!r}")


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.5 * free)
    try:
        return int(0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def adjoint_meta_grad(model: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      theta: torch.Tensor, T: Union[float, torch.Tensor], *, support, query,
                      h: float = 0.01, solver: str = "dopri5", adjoint: str = "heun",
                      rtol: float = 1e-6, atol: float = 1e-8, memory: str = "store",
                      batched: bool = False, memory_budget: Optional[int] = None,
                      max_steps: Optional[int] = None, compile: bool = False,
                      error_estimate: Union[bool, str] = True, error_tol: float = 1e-2, strict: bool = False,
                      refine: bool = False, _refinements: int = 0) -> MetaGradResult:
    """The A-MAML meta-gradient ``d V(u(T)) / d theta`` of inner training by gradient flow.

    Args:
        model: any ``nn.Module``; its parameters are replaced by ``theta`` (never mutated).
        loss: ``loss(pred, target) -> scalar``, e.g. ``torch.nn.functional.mse_loss``.
        theta: flat parameters ``[d]`` in ``model.named_parameters()`` order
            (:func:`amaml_ext.flatten_params`).
        T: inner horizon (``T = K h`` is K GD steps of size h), or with ``batched=True`` a
            tensor ``[B]`` of per-task horizons (a task stays fixed after its own T).
        support, query: ``(x, y)`` of one task; with ``batched=True`` B tasks, every tensor with
            a leading task dimension.
        h: grid spacing (the GD step size for ``solver="euler"``); ``T / h`` must be whole.
        solver: ``"dopri5"``, ``"rk4"`` or ``"euler"`` (:data:`amaml_ext.ode.FORWARD_METHODS`).
        adjoint: ``"heun"``, ``"rk4"`` or ``"discrete"`` (:data:`amaml_ext.ode.ADJOINT_METHODS`).
        rtol, atol: dopri5 tolerances.
        memory: ``"store"`` keeps all N+1 grid states; ``"checkpoint"`` keeps about
            ``2 sqrt(N)`` and recomputes segments (same gradient, bit for bit on the CPU);
            ``"auto"`` stores when the trajectory fits ``memory_budget`` bytes (default: half
            the free GPU memory, or a quarter of the RAM) and checkpoints otherwise.
        memory_budget: bytes for ``memory="auto"``.
        max_steps: dopri5 step limit, accepted + rejected (default ``max(1000, 10 N)``: on a
            smooth loss dopri5 needs fewer steps than the grid has intervals); exceeding it raises.
        compile: evaluate the training-loss gradient and HVPs with ``torch.compile``-d
            ``torch.func`` functions (forward-over-reverse HVPs). For small models, where eager
            PyTorch overhead dominates, 4-6x faster per gradient/HVP call and 2.4-3.5x per meta-gradient
            (docs/benchmarks.md) after a one-off compilation of
            seconds per model and input shape (reused across calls with new data of the same
            shapes); no gain for convolutional nets on the CPU. Falls back to eager with a
            warning if compilation fails. ``stats["compiled"]`` says which ran.
        error_estimate: estimate the relative error of a continuous adjoint (``heun``/``rk4``)
            by the drift of the invariant ``lam . grad L``, which the exact flow and adjoint
            conserve (:mod:`amaml_ext.accuracy`; one gradient and a dot product per node,
            about 1% of a meta-gradient). ``"richardson"`` adds step doubling on the stored states
            (one more HVP per interval, no extra linearisation) and reports the larger of the two;
            ``False`` turns the estimate off. The exact mode (``adjoint="discrete"``) has none.
        error_tol: relative error above which :class:`amaml_ext.AdjointAccuracyWarning` is
            issued, naming the estimate, ``h * lambda_max`` against the scheme's stability bound
            and what to do.
        strict: raise :class:`amaml_ext.AdjointAccuracyError` instead of warning.
        refine: when the estimate exceeds ``error_tol`` on a smooth flow, solve again on the
            finer grid the estimate suggests (up to 3 times); ``stats["h"]`` is the grid used.

    Returns:
        :class:`MetaGradResult`.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> theta = amaml_ext.flatten_params(net)
        >>> xs, ys = torch.randn(10, 1), torch.randn(10, 1)
        >>> r = amaml_ext.adjoint_meta_grad(net, torch.nn.functional.mse_loss, theta, 1.0,
        ...                                 support=(xs, ys), query=(xs, ys))
        >>> r.grad.shape
        torch.Size([...])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss):
        raise TypeError(f"argument 'loss' must be callable loss(pred, target), got {type(loss).__name__}")
    if not isinstance(theta, torch.Tensor):
        raise TypeError(f"argument 'theta' must be a torch.Tensor, got {type(theta).__name__}")
    d = sum(math.prod(s) for _, s in param_shapes(model))
    if d == 0:
        raise ValueError("argument 'model' has no trainable parameters (none with requires_grad=True): there is "
                         "nothing to adapt or meta-learn")
    if theta.dim() != 1 or theta.numel() != d:
        raise ValueError(f"argument 'theta' must have shape [{d}] (the model's parameter count), got {tuple(theta.shape)}")
    if theta.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"argument 'theta' must be float32 or float64, got {theta.dtype}")
    if solver not in ode.FORWARD_METHODS:
        raise ValueError(f"argument 'solver' must be one of {ode.FORWARD_METHODS}, got {solver!r}")
    if adjoint not in ode.ADJOINT_METHODS:
        raise ValueError(f"argument 'adjoint' must be one of {ode.ADJOINT_METHODS}, got {adjoint!r}")
    if memory not in MEMORY_MODES:
        raise ValueError(f"argument 'memory' must be one of {MEMORY_MODES}, got {memory!r}")
    xs, ys = _check_pair("support", support, batched)
    xq, yq = _check_pair("query", query, batched)
    for name, t in (("support x", xs), ("support y", ys), ("query x", xq), ("query y", yq)):
        if t.device != theta.device:
            raise ValueError(f"argument '{name.split()[0]}' ({name}) must be on theta's device {theta.device}, got {t.device}")
        if t.is_floating_point() and t.dtype != theta.dtype:
            raise ValueError(f"argument '{name.split()[0]}' ({name}) must have theta's dtype {theta.dtype}, got {t.dtype}")
    for p in list(model.parameters()) + list(model.buffers()):
        if p.device != theta.device:
            raise ValueError(f"argument 'model' must be on theta's device {theta.device}, has a tensor on {p.device}")
    batch = xs.shape[0] if batched else 1
    if batched and xq.shape[0] != batch:
        raise ValueError(f"arguments 'support' and 'query' must hold the same number of tasks, got {batch} and {xq.shape[0]}")

    _check_solver_options(rtol, atol, max_steps, memory_budget)
    h = ode._check_positive_real("h", h)
    T_max, per_task_T = _horizons(T, h, batched, batch)
    n = ode.grid_size(T_max, h)

    if not isinstance(compile, bool):
        raise TypeError(f"argument 'compile' must be a bool, got {type(compile).__name__}")
    for name, v in (("strict", strict), ("refine", refine)):
        if not isinstance(v, bool):
            raise TypeError(f"argument '{name}' must be a bool, got {type(v).__name__}")
    if error_estimate not in (True, False, "drift", "richardson"):
        raise ValueError(f"argument 'error_estimate' must be True, False, 'drift' or 'richardson', "
                         f"got {error_estimate!r}")
    error_tol = ode._check_positive_real("error_tol", error_tol)
    estimate = error_estimate is not False and adjoint != "discrete"
    richardson = estimate and error_estimate == "richardson"
    fns = TaskFunctions(model, loss, support, query, batched, compile=compile)
    u0 = theta.detach().expand(batch, d).contiguous() if batched else theta.detach().clone()

    # Phases: grid ranges [a, b] in which the set of active tasks is constant. Without
    # per-task horizons there is one phase [0, N]. A task with horizon T_b is active in the
    # phases before row T_b / h and frozen (f = 0, vjp = 0) after it; splitting the run there
    # keeps the right-hand side smooth inside every solve (an RK step never straddles T_b).
    if per_task_T is not None:
        stops = sorted({ode.grid_size(tb, h) for tb in per_task_T.tolist()} | {n})
        horizon_rows = torch.tensor([ode.grid_size(tb, h) for tb in per_task_T.tolist()])
        phases, a = [], 0
        for b in stops:
            mask = (horizon_rows > a).to(device=theta.device, dtype=theta.dtype).unsqueeze(1)
            phases.append((a, b, mask))
            a = b
    else:
        phases = [(0, n, None)]

    def make_f(mask):
        def f(t: float, u: torch.Tensor) -> torch.Tensor:
            g = fns.grad(u).neg_()
            return g if mask is None else g.mul_(mask)
        return f

    def make_vjp(mask):
        def vjp(t: float, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            hv = fns.hvp(u, v, key=t).neg_()
            return hv if mask is None else hv.mul_(mask)
        return vjp

    state_bytes = u0.numel() * u0.element_size()
    if memory == "auto":
        budget = _default_budget(theta.device) if memory_budget is None else int(memory_budget)
        memory = "store" if (n + 1) * state_bytes <= budget else "checkpoint"
    times = ode._grid_times(T_max, n)
    shape = list(u0.shape)
    rows = batch if batched else 1
    if max_steps is None:
        max_steps = max(1000, 10 * n)

    def forward(mask, y_start, a, b):
        """States on rows a..b from y_start ([rows, d]) by the chosen solver: [b-a+1, rows, d]."""
        if solver == "dopri5":
            seg, st, _ = _C.dopri5_forward(make_f(mask), y_start, shape, times[a:b + 1], float(rtol),
                                           float(atol), int(max_steps), 0.0)
        else:
            seg, st = _C.fixed_forward(make_f(mask), y_start, shape, times[a:b + 1], solver)
        return seg, st

    # dopri5 with checkpoints: the forward keeps the step log and at most m step-start states;
    # the backward replays the accepted steps from the nearest checkpoint (bit-identical rows).
    logs = {}

    def dopri5_checkpointed(mask, y_start, a, b):
        _, st, log = _C.dopri5_forward(make_f(mask), y_start, shape, times[a:b + 1], float(rtol),
                                       float(atol), int(max_steps), 0.0, False, m)
        logs[(a, b)] = log
        return log["final"], st

    def dopri5_rows(mask, a, b, lo, hi):
        """Grid rows a+lo .. a+hi of phase (a, b), recomputed from the log."""
        log = logs[(a, b)]
        s_lo = 0 if lo == 0 else int(log["row_step"][lo])
        start = max(k for k in log["checkpoints"] if k <= s_lo)
        s_hi = int(log["row_step"][hi])
        return _C.dopri5_replay(make_f(mask), log["checkpoints"][start], shape, log["step_t"],
                                log["step_h"], start, s_hi, log["row_step"], log["row_theta"], lo, hi)

    m = _segment_length(n)
    fstats = {"function_evals": 0, "accepted_steps": 0, "rejected_steps": 0}
    kept = {}  # store: (a, b) -> segment states; checkpoint: row -> state
    y = u0.reshape(rows, -1)
    if memory == "checkpoint" and solver != "dopri5":
        kept[0] = y  # row 0 of the first segment; u0 is our own copy
    peak_rows = 0
    try:
        with torch.no_grad():
            for a, b, mask in phases:
                if memory == "checkpoint" and solver == "dopri5":
                    y, st = dopri5_checkpointed(mask, y, a, b)
                    for k in fstats:
                        fstats[k] += st[k]
                    continue
                pieces = [(a, b)] if memory == "store" else list(reversed(_segments(a, b, m)))
                for c, e in pieces:
                    seg, st = forward(mask, y, c, e)
                    for k in fstats:
                        fstats[k] += st[k]
                    if memory == "store":
                        kept[(c, e)] = seg
                        peak_rows += e - c + 1
                    else:
                        kept[e] = seg[-1].clone()
                    y = seg[-1] if memory == "store" else kept[e]
                    del seg
    except ValueError as e:
        if "non-finite" in str(e):
            raise ValueError(f"adjoint_meta_grad: the inner training loss or its gradient became "
                             f"non-finite: {e}") from None
        if "reached max_steps" in str(e):
            raise ValueError(f"adjoint_meta_grad(solver='dopri5', rtol={rtol:g}, atol={atol:g}, h={h:g}): {e}. "
                             f"A training loss that is not smooth (ReLU, max-pool) makes dopri5's steps "
                             f"collapse; solver='rk4' or 'euler' step on the grid instead.") from None
        raise
    if solver == "dopri5" and fstats["accepted_steps"] > n:
        warnings.warn(f"adjoint_meta_grad: dopri5 took {fstats['accepted_steps']} accepted and "
                      f"{fstats['rejected_steps']} rejected steps for {n} grid intervals of h={h:g} (rtol={rtol:g}, "
                      f"atol={atol:g}): its steps fell below h, because the training loss is not smooth (ReLU, "
                      f"max-pool) or the flow is stiff (Hessian eigenvalues near 2/h or above, where GD "
                      f"with step h and the grid adjoint are unstable too: rescale the inputs or lower h). "
                      f"For a non-smooth loss, solver='rk4' or 'euler' on the grid cost less.", RuntimeWarning, stacklevel=2)
    if memory == "checkpoint":
        peak_rows = len(kept) + sum(len(log["checkpoints"]) for log in logs.values()) + m + 1
    u_T = y.reshape(shape).clone()

    val_loss, lam_T = fns.value_and_grad_val(u_T)
    if not bool(torch.isfinite(val_loss).all()) or not bool(torch.isfinite(lam_T).all()):
        raise ValueError(f"adjoint_meta_grad: the validation loss at u(T) (t={T_max}, step {n}) is "
                         f"non-finite: {val_loss.tolist()}")
    lam = lam_T.reshape(rows, -1).contiguous()
    adjoint_steps = 0
    coarse, monitor = None, None
    if estimate:
        coarse = lam.clone() if richardson else None
        monitor = accuracy.ErrorMonitor(lambda t: fns.grad_at(t))
        monitor.mask = phases[-1][2]
        with torch.no_grad():
            monitor.start(lam, fns.grad(u_T).reshape(rows, -1))
    try:
        with torch.no_grad():
            for a, b, mask in reversed(phases):
                if monitor is not None:
                    monitor.set_mask(mask, lam, float(times[b]))
                pieces = [(a, b)] if memory == "store" else _segments(a, b, m)
                for c, e in pieces:
                    if memory == "store":
                        seg = kept.pop((c, e))
                    elif solver == "dopri5":
                        seg = dopri5_rows(mask, a, b, c - a, e - a)
                    else:
                        seg, _ = forward(mask, kept[c], c, e)
                    lam, st, coarse = _C.adjoint_solve(make_vjp(mask), seg, shape, times[c:e + 1], lam, adjoint,
                                                       coarse, c, None if monitor is None else monitor.node)
                    adjoint_steps += st["steps"]
                    del seg
            checks = _accuracy_stats(fns, lam, coarse, monitor, u0, u_T, times, rows, h, T_max, solver, adjoint,
                                     error_tol) if estimate else {}
    finally:
        fns.release()
    grad = lam.view(shape)

    stats = {
        "grad_evals": fns.grad_evals + 1,  # + the validation gradient
        "hvps": fns.hvp_evals,
        "linearisations": fns.linearisations,
        "compiled": fns.compiled,
        "accepted_steps": fstats["accepted_steps"],
        "rejected_steps": fstats["rejected_steps"],
        "grid_steps": n,
        "adjoint_steps": adjoint_steps,
        "trajectory_bytes": peak_rows * state_bytes,
        "memory": memory,
        "solver": solver,
        "adjoint": adjoint,
        "h": h,
        "error_tol": error_tol if estimate else None,
        "adjoint_error_estimate": None, "richardson_estimate": None, "invariant_drift": None,
        "h_lambda_max": None, "nonsmooth_modules": None,
    }
    stats.update(checks)
    result = MetaGradResult(grad=grad, loss=val_loss, params=u_T, stats=stats)
    if not estimate or stats["adjoint_error_estimate"] <= error_tol:
        return result
    bound = min(accuracy.STABILITY_BOUNDS[adjoint], accuracy.STABILITY_BOUNDS.get(solver, math.inf))
    nonsmooth = accuracy.is_nonsmooth(stats, error_tol, bound)
    if refine and not nonsmooth and _refinements < 3:
        h_new = accuracy.suggested_h(estimate=stats["adjoint_error_estimate"], tol=error_tol, h=h, T=T_max,
                                     adjoint=adjoint, h_lambda=stats["h_lambda_max"], bound=bound)
        if h_new < h * (1 - 1e-9):
            return adjoint_meta_grad(model, loss, theta, T, support=support, query=query, h=h_new, solver=solver,
                                     adjoint=adjoint, rtol=rtol, atol=atol, memory=memory, batched=batched,
                                     memory_budget=memory_budget, max_steps=max_steps, compile=compile,
                                     error_estimate=error_estimate, error_tol=error_tol, strict=strict, refine=True,
                                     _refinements=_refinements + 1)
    msg = "adjoint_meta_grad: " + accuracy.advice(stats, tol=error_tol, h=h, T=T_max, solver=solver,
                                                  adjoint=adjoint)
    if strict:
        raise AdjointAccuracyError(msg)
    warnings.warn(msg, AdjointAccuracyWarning, stacklevel=2 + _refinements)
    return result


def _accuracy_stats(fns: TaskFunctions, lam, coarse, monitor, u0, u_T, times, rows: int, h: float, T: float,
                    solver: str, adjoint: str, tol: float) -> Dict[str, Any]:
    """The error estimates of a finished adjoint solve, and h * lambda_max when they exceed ``tol``
    (power iterations at u(0), whose linearisation the adjoint made last, and at u(T))."""
    rich = None if coarse is None else accuracy.richardson(lam, coarse, adjoint)
    out = accuracy.summary(rich, monitor.relative_drift())
    if out["adjoint_error_estimate"] > tol:
        out["nonsmooth_modules"] = accuracy.nonsmooth_modules(fns.model)
        lam_max = 0.0
        for key, u in ((float(times[0]), u0), (T, u_T)):
            lam_max = max(lam_max, accuracy.lambda_max(
                lambda v: fns.hvp(u, v.reshape(u.shape), key=key).reshape(rows, -1), lam))
        out["h_lambda_max"] = h * lam_max
    return out


# ---- checkpoint segments --------------------------------------------------------------------

def _segment_length(n: int) -> int:
    """Grid intervals per checkpoint segment: about sqrt(N), even (RK4 adjoint pairs)."""
    m = max(2, int(math.ceil(math.sqrt(n))))
    return m + (m % 2)


def _segments(a: int, b: int, m: int):
    """Segments [(c, e)] covering rows a..b, top first, m intervals each except the top one,
    which absorbs the remainder. The RK4 adjoint pairs intervals from the top of each solve and
    takes its odd-N step (which needs >= 3 intervals) at the top, so with this layout a
    checkpointed adjoint makes exactly the steps of the stored one."""
    n = b - a
    top = n % m or m
    if top < 3 and n - top >= m:
        top += m
    bounds, e = [], b
    c = max(a, e - top)
    bounds.append((c, e))
    e = c
    while e > a:
        c = max(a, e - m)
        bounds.append((c, e))
        e = c
    return bounds
