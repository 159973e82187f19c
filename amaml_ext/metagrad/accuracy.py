"""How far a continuous adjoint meta-gradient can be trusted.

Every continuous adjoint solve (``adjoint="heun"`` or ``"rk4"``) comes with an estimate of the
relative error of its gradient; the exact mode (``solver="euler", adjoint="discrete"``) is the
exact gradient of GD steps and needs none.

* **Invariant drift (the default, nearly free).** Along the exact gradient flow ``u' = -g(u)``
  and its exact adjoint ``lam' = H(u) lam``, ``I(t) = lam(t) . g(u(t))`` is constant
  (``dI/dt = lam.H g - lam.H g = 0``, H symmetric). A discretisation error ``dlam`` made in a step
  changes I by ``dlam . g``; where the gradient field jumps (ReLU, max-pool) the classical
  adjoint, which sees only the Hessians along the path, misses the jump terms and I jumps with
  ``g``. The drift ``sum_j |I_j - I_{j+1}| / max_j |lam_j| |g_j|`` (per task) costs one gradient
  and a dot product per node: the gradient at each stored state is a by-product of the HVP's
  linearisation there. It flags non-smooth flows, and unstable steps whose growth shows along
  ``g``. On smooth flows it is an
  estimate, not a bound: within a factor of 3 of the true error in the suite's cases
  (python_tests/metagrad/test_accuracy.py), but 2-9.5x *under* it on the paper's MLP (2-32-32-1, T = 1-4,
  h = 0.05-0.1) in the second reliability trial (RK4 adjoint up to 9.5x, Heun up to 8x), where it
  errs only along ``g``. Where the gradient must be trusted to its tolerance, ask for
  ``"richardson"`` too (conservative in those cases: 18x over) or use the exact mode.
* **Step doubling (``error_estimate="richardson"``).** The same adjoint scheme with twice the
  step runs alongside on the stored states (Heun over ``2h``, RK4 over ``4h``), its VJPs made
  right next to the fine solve's at the same states, reusing its linearisations: one extra HVP
  per interval and no extra linearisation. ``|lam_h - lam_2h| / (2^p - 1) / |lam_h|`` is the
  classical estimate of a smooth, resolved solve, and sees errors orthogonal to ``g`` that the
  drift cannot. It cannot see the jumps of a non-smooth field (both of its solves converge to the
  same wrong limit), and it is conservative once ``2h`` (RK4: ``4h``) is past the stability bound.
  The reported estimate is then the larger of the two.

* **Stability along the path (always, nearly free).** Every HVP ``H x`` the adjoint makes
  gives a Rayleigh quotient ``x . H x / x . x``, a lower bound of ``lambda_max`` there; their
  largest, times h, is compared with the adjoint scheme's stability bound. Past it the solve
  grows without limit, and where the training gradient has no component along the unstable
  direction the invariant cannot see it (measured on Alpine: a Heun adjoint at h = 0.01 with
  ``h * lambda_max`` = 3.3 gave a meta-gradient of 2e20 for a true 4.8, its drift 1e-3). The
  estimate is then ``inf``. As the adjoint's unstable direction grows it dominates the adjoint,
  so the quotient reaches ``lambda_max`` exactly when it matters; a lower bound, it never flags
  a solve whose steps are all within the bound.

The estimate is per task, maximised over the tasks. Past the tolerance,
:class:`AdjointAccuracyWarning` (or, ``strict=True``, :class:`AdjointAccuracyError`) names the
numbers, ``h * lambda_max`` of the training-loss Hessian (a few power iterations at ``u(0)`` and
``u(T)``) against the scheme's stability bound, the model's non-smooth modules, and what to do.
"""

import math
from typing import Any, Callable, Dict, List, Optional

import torch

# The orders and stability bounds of the schemes, and the step-doubling estimate, live with the
# schemes (amaml_ext.ode.schemes); re-exported here.
from ..ode.schemes import ADJOINT_SCHEMES, ORDERS, STABILITY_BOUNDS, richardson  # noqa: F401

__all__ = ["AdjointAccuracyWarning", "AdjointAccuracyError", "AdjointUnstable", "ORDERS", "STABILITY_BOUNDS", "richardson",
           "ErrorMonitor", "lambda_max", "advice", "stability_bound"]


class AdjointAccuracyWarning(RuntimeWarning):
    """A continuous adjoint meta-gradient whose error estimate exceeds the tolerance.

    The message names the estimate, ``h * lambda_max`` against the stability bound and what to
    do (:func:`advice`).

    Example:
        >>> import torch, warnings, amaml_ext
        >>> _ = torch.manual_seed(0)
        >>> net, x = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)), torch.randn(9, 1)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = amaml_ext.adjoint_meta_grad(net, torch.nn.functional.mse_loss, amaml_ext.flatten_params(net),
        ...                                     2.0, support=(x, x.abs()), query=(x, x.abs()), h=0.5,
        ...                                     solver="rk4", error_tol=1e-9)
        >>> [w.category.__name__ for w in caught]
        ['AdjointAccuracyWarning']
    """


class AdjointAccuracyError(ValueError):
    """Raised instead of :class:`AdjointAccuracyWarning` with ``strict=True``.

    Example:
        >>> import torch, amaml_ext
        >>> _ = torch.manual_seed(0)
        >>> net, x = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)), torch.randn(9, 1)
        >>> amaml_ext.adjoint_meta_grad(net, torch.nn.functional.mse_loss, amaml_ext.flatten_params(net), 2.0,
        ...                             support=(x, x.abs()), query=(x, x.abs()), h=0.5, solver="rk4",
        ...                             error_tol=1e-9, strict=True)
        Traceback (most recent call last):
        ...
        amaml_ext.metagrad.accuracy.AdjointAccuracyError: adjoint_meta_grad: the continuous adjoint ...
    """


class AdjointUnstable(FloatingPointError):
    """The continuous adjoint overflowed because a step met ``h * lambda`` past its scheme's
    stability bound (seen by the adjoint's own Hessian products); the inner flow itself was
    finite. ``refine=True`` solves again on a grid within the bound instead of raising.
    ``h_lambda`` and ``bound`` hold the numbers, ``h_within`` a grid step within the bound.

    Example:
        >>> from amaml_ext import accuracy
        >>> e = accuracy.AdjointUnstable("adjoint_meta_grad", h=0.01, T=2.0, h_lambda=3.3, bound=2.0, adjoint="heun")
        >>> round(e.h_within, 5), isinstance(e, FloatingPointError)      # h * lambda 3.3 -> 1, half the bound
        (0.00303, True)
    """

    def __init__(self, caller: str, *, h: float, T: float, h_lambda: float, bound: float, adjoint: str):
        self.h_lambda, self.bound = h_lambda, bound
        self.numbers = dict(h=h, T=T, h_lambda=h_lambda, bound=bound, adjoint=adjoint)
        self.h_within = T / max(1, math.ceil(T / (0.5 * bound * h / h_lambda) - 1e-9))
        super().__init__(
            f"{caller}: the {adjoint} adjoint (h={h:g}, T={T:g}) overflowed: a step met h * lambda of the "
            f"training-loss Hessian of at least {h_lambda:.3g}, past the scheme's stability bound {bound:.4g}, where "
            f"the adjoint solve grows without limit (the inner flow itself is finite). Use refine=True where it is "
            f"offered (solves again on a grid within the bound), a grid step of about h={self.h_within:.3g}, or "
            f"solver='euler', "
            f"adjoint='discrete' for the exact gradient of T/h GD steps")


class ErrorMonitor:
    """Collects the invariant ``I_j = lam_j . g_j`` at the adjoint's nodes (per task row).

    ``grad_at(row)`` returns the training-loss gradient of the state linearised last (the node's,
    at that grid row), ``mask`` zeroes frozen tasks. Tensors stay on the device: no host synchronisation per node.

    Example:
        >>> import torch
        >>> m = ErrorMonitor(grad_at=lambda row: None)
        >>> m.add(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]))     # I = 1 at the first node
        >>> m.add(torch.tensor([[1.1, 0.0]]), torch.tensor([[1.0, 1.0]]))     # I = 1.1 at the next
        >>> m.relative_drift()                 # |1.1 - 1| / max |lam| |g|, kept in float64
        tensor([0.0643], dtype=torch.float64)
    """

    def __init__(self, grad_at: Callable[[int], Optional[torch.Tensor]], rows: Optional[int] = None):
        self.grad_at = grad_at
        self.prev: Optional[torch.Tensor] = None
        self.drift: Optional[torch.Tensor] = None
        self.scale: Optional[torch.Tensor] = None
        self.mask: Optional[torch.Tensor] = None
        self.curvature: Optional[torch.Tensor] = None
        self.rows = rows

    def observe(self, x: torch.Tensor, hx: torch.Tensor, v: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> None:
        """One product ``hx = H x`` the adjoint made, ``x = lr * v`` (the adjoint or a stage of it,
        ``v``, times the step sizes if learned; default ``v = x``). Keeps the largest Rayleigh
        quotient ``x . H x / x . v`` per row (the metric that makes ``H lr`` symmetric; rows
        where ``mask`` is 0 are frozen and skipped), in float64: a lower bound of lambda_max along
        the path, which the adjoint reaches when a step is past its stability bound (its unstable
        direction then dominates; the solve blows up in directions the invariant does not see)."""
        rows = self.rows or (x.shape[0] if self.prev is None else self.prev.shape[0])
        x64 = x.double()
        w = x64 * (x64 if v is None else v.double())
        if mask is not None:
            w = w * mask
        num, den = (x64 * hx.double()).reshape(rows, -1).sum(-1), w.reshape(rows, -1).sum(-1)
        q = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))
        q = torch.where(torch.isfinite(q), q, torch.zeros_like(q))        # an overflowed product: no quotient
        self.curvature = q if self.curvature is None else torch.maximum(self.curvature, q)

    def lambda_seen(self) -> float:
        """The largest finite Rayleigh quotient :meth:`observe` saw, over the rows (0 before any)."""
        return 0.0 if self.curvature is None else float(self.curvature.max())

    def add(self, lam: torch.Tensor, g: torch.Tensor) -> None:
        """One node: the adjoint ``lam`` and the training gradient ``g`` there (``[rows, d]``)."""
        if self.mask is not None:
            g = g * self.mask
        lam, g = lam.double(), g.double()     # a float32 adjoint of 1e20 has a float32 norm of inf
        inv = (lam * g).sum(-1)
        size = lam.norm(dim=-1) * g.norm(dim=-1)
        if self.prev is None:
            self.drift = torch.zeros_like(inv)
            self.scale = size
        else:
            self.drift += (inv - self.prev).abs()
            self.scale = torch.maximum(self.scale, size)
        self.prev = inv

    def set_mask(self, mask: Optional[torch.Tensor], lam: torch.Tensor, row: int) -> None:
        """A new phase of per-task horizons starts at grid row ``row``: tasks that become active there
        start their invariant afresh (their I was 0 while frozen; the step is no drift)."""
        self.mask = mask
        if self.prev is not None:
            g = self.grad_at(row)
            if g is not None:
                g = g.reshape(lam.shape)
                self.prev = (lam.double() * (g if mask is None else g * mask).double()).sum(-1)

    def node(self, row: int, lam: torch.Tensor) -> None:
        """The adjoint's callback at the grid node ``row``: :meth:`add` with the gradient there."""
        g = self.grad_at(row)
        if g is not None:       # the node's linearisation is the last one made (always, by the drivers)
            self.add(lam, g.reshape(lam.shape))

    def relative_drift(self) -> torch.Tensor:
        """``[rows]``: the drift of the invariant over the largest ``|lam| |g|`` (0 before any node)."""
        if self.drift is None:
            return torch.zeros(())
        tiny = torch.finfo(self.drift.dtype).tiny
        return torch.where(self.scale > tiny, self.drift / self.scale.clamp_min(tiny), torch.zeros_like(self.drift))


def lambda_max(hvp: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor, iters: int = 12) -> float:
    """Largest-magnitude eigenvalue of the Hessian by power iteration (per task row; the max).

    Args:
        hvp: ``hvp(v) -> H v`` for ``v`` shaped like ``like``.
        like: ``[rows, d]``, giving the shape, dtype and device.
        iters: power iterations (the start vector is seeded: the same result every call).

    Returns:
        float: ``|lambda_max|``, the largest over the rows.

    Example:
        >>> import torch
        >>> H = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))
        >>> round(lambda_max(lambda v: v @ H, torch.zeros(1, 2, dtype=torch.float64)), 6)
        3.0
    """
    g = torch.Generator(device="cpu").manual_seed(1234)
    v = torch.randn(like.shape, generator=g, dtype=like.dtype).to(like.device)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(like.dtype).tiny)
    lam = torch.zeros(like.shape[0], dtype=like.dtype, device=like.device)
    for _ in range(iters):
        w = hvp(v)
        lam = (w * v).sum(-1)
        n = w.norm(dim=-1, keepdim=True)
        if not bool((n > 0).all()):
            break
        v = w / n
    return float(lam.abs().max())


NONSMOOTH_MODULES = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.PReLU, torch.nn.RReLU,
                     torch.nn.Hardtanh, torch.nn.Hardswish, torch.nn.Hardsigmoid, torch.nn.Hardshrink,
                     torch.nn.Softshrink, torch.nn.Threshold, torch.nn.MaxPool1d, torch.nn.MaxPool2d,
                     torch.nn.MaxPool3d, torch.nn.AdaptiveMaxPool1d, torch.nn.AdaptiveMaxPool2d,
                     torch.nn.AdaptiveMaxPool3d, torch.nn.FractionalMaxPool2d, torch.nn.FractionalMaxPool3d)
"""Module types whose output has a kink (the training loss's gradient jumps across it)."""


def nonsmooth_modules(model: torch.nn.Module) -> List[str]:
    """Names of the submodules of ``model`` whose gradient field jumps (ReLU, max-pool, ...);
    functional calls (``F.relu``) cannot be seen here, the invariant's drift still can."""
    return [f"{name or type(model).__name__} ({type(m).__name__})" for name, m in model.named_modules()
            if isinstance(m, NONSMOOTH_MODULES)]


def stability_bound(solver: str, adjoint: str) -> float:
    """The tighter of the forward's and the adjoint's bound in ``h * lambda_max`` (dopri5 has none:
    it steps itself; the RK4 adjoint's is about 1.393, half RK4's, as it steps over pairs of
    intervals).

    Example:
        >>> stability_bound("euler", "discrete"), round(stability_bound("dopri5", "rk4"), 3)
        (2.0, 1.393)
    """
    return min(STABILITY_BOUNDS["adjoint"].get(adjoint, math.inf), STABILITY_BOUNDS["forward"].get(solver, math.inf))


def _bound_owner(solver: str, adjoint: str) -> str:
    """Which scheme sets :func:`stability_bound` (in words)."""
    fwd = STABILITY_BOUNDS["forward"].get(solver, math.inf)
    adj = STABILITY_BOUNDS["adjoint"].get(adjoint, math.inf)
    if adj <= fwd:
        span = ADJOINT_SCHEMES[adjoint].span
        return f"the {adjoint} adjoint" + (f" (one step spans {span} intervals)" if span > 1 else "")
    return f"the {solver} forward"


def suggested_h(*, estimate: float, tol: float, h: float, T: float, adjoint: str,
                h_lambda: Optional[float], bound: float) -> float:
    """A grid step expected to bring the estimate to half the tolerance (order p: error ~ h^p),
    kept within half the stability bound, and dividing T."""
    p = ORDERS[adjoint]
    h_new = h * (0.5 * tol / estimate) ** (1.0 / p) if math.isfinite(estimate) and estimate > 0 else 0.1 * h
    h_new = max(h_new, 1e-3 * h)
    if h_lambda is not None and math.isfinite(h_lambda) and h_lambda > 0:
        h_new = min(h_new, 0.5 * bound * h / h_lambda)
    return T / max(1, math.ceil(T / h_new - 1e-9))


def is_nonsmooth(stats: Dict[str, Any], tol: float, bound: float) -> bool:
    """Whether the gradient field's jumps, not the step, are to blame for an estimate past ``tol``:
    the model has non-smooth modules, or the invariant drifts more than step doubling says; and
    ``h * lambda_max`` is within the stability bound (past it the step is to blame first)."""
    hl = stats.get("h_lambda_max")
    if hl is not None and hl > bound:
        return False
    if stats.get("nonsmooth_modules"):
        return True
    rich = stats.get("richardson_estimate")
    return rich is not None and stats["invariant_drift"] > tol and stats["invariant_drift"] >= 10 * rich


def advice(stats: Dict[str, Any], *, tol: float, h: float, T: float, solver: str, adjoint: str) -> str:
    """The text of the warning/error: the numbers and what to do.

    Args:
        stats: the meta-gradient's statistics (``adjoint_error_estimate``, ``invariant_drift``,
            optionally ``richardson_estimate``, ``h_lambda_max``, ``nonsmooth_modules``).
        tol: the tolerance exceeded.
        h: the grid step.
        T: the horizon.
        solver: the forward method.
        adjoint: the adjoint method.

    Example:
        >>> stats = {"adjoint_error_estimate": 0.05, "invariant_drift": 0.05, "h_lambda_max": 0.5}
        >>> text = advice(stats, tol=0.01, h=0.1, T=1.0, solver="dopri5", adjoint="heun")
        >>> text[text.index("A step"):text.index(" should")]
        'A step of about h=0.0312 (T/h = 32)'
    """
    estimate, drift, rich = stats["adjoint_error_estimate"], stats["invariant_drift"], stats.get("richardson_estimate")
    h_lambda = stats.get("h_lambda_max")
    bound = stability_bound(solver, adjoint)
    scheme = f"solver={solver!r}, adjoint={adjoint!r}"
    how = f"invariant drift {drift:.3g}" + ("" if rich is None else f", step-doubling estimate {rich:.3g}")
    if math.isinf(estimate) and h_lambda is not None and h_lambda > bound:
        parts = [f"the continuous adjoint meta-gradient ({scheme}, h={h:g}, T={T:g}) has no error bound: a "
                 f"step of its adjoint met curvature past the scheme's stability bound, where the solve grows "
                 f"without limit in directions the estimate ({how}) does not see."]
    elif not math.isfinite(estimate):
        parts = [f"the continuous adjoint meta-gradient ({scheme}, h={h:g}, T={T:g}) has no error estimate: "
                 f"a solve behind it overflowed ({how})."]
    else:
        parts = [f"the continuous adjoint meta-gradient ({scheme}, h={h:g}, T={T:g}) has an estimated "
                 f"relative error of {estimate:.3g} > error_tol={tol:g} ({how})."]
    if h_lambda is not None:
        state = "beyond" if h_lambda > bound else "within"
        parts.append(f"h * lambda_max of the training-loss Hessian is {h_lambda:.3g}, {state} the stability "
                     f"bound {bound:.4g} of {_bound_owner(solver, adjoint)}.")
    mods = stats.get("nonsmooth_modules") or []
    if is_nonsmooth(stats, tol, bound):
        found = f" (the model has {', '.join(mods[:3])}{', ...' if len(mods) > 3 else ''})" if mods else ""
        parts.append(f"The gradient field is not smooth along the path{found}: the classical adjoint is not the "
                     "derivative of such a flow whatever h. Use solver='euler', adjoint='discrete' for the exact "
                     "gradient of T/h GD steps, or smooth activations and pooling (GELU/ELU/softplus, average "
                     "pooling; amaml_ext.models.Conv4(activation='gelu', pool='avg')).")
    else:
        h_new = suggested_h(estimate=estimate, tol=tol, h=h, T=T, adjoint=adjoint, h_lambda=h_lambda, bound=bound)
        n_new = round(T / h_new)
        parts.append(f"A step of about h={T / n_new:.3g} (T/h = {n_new}) should meet the tolerance "
                     "(refine=True solves again with it); or use solver='euler', adjoint='discrete' "
                     "for the exact gradient of T/h GD steps.")
        if mods:
            parts.append(f"The model also has non-smooth modules ({', '.join(mods[:3])}): no h makes the continuous "
                         "adjoint right for them; the exact mode or smooth activations and pooling are the way.")
    parts.append("Pass error_tol=... to change the tolerance, strict=True to raise, error_estimate=False to "
                 "skip the estimate.")
    return " ".join(parts)


def summary(rich: Optional[torch.Tensor], drift: torch.Tensor) -> Dict[str, Any]:
    est = drift if rich is None else torch.maximum(rich, drift)
    est = torch.nan_to_num(est, nan=math.inf)       # an overflowed solve has no estimate: inf, never hidden
    return {"adjoint_error_estimate": float(est.max()),
            "richardson_estimate": None if rich is None else float(rich.max()),
            "invariant_drift": float(drift.max())}
