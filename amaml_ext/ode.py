"""Generic ODE API over the C++ solver drivers.

Forward: ``dy/dt = f(t, y)`` on ``[0, T]``, states stored on the fixed grid ``t_j = j h``
(``j = 0..N``, ``N = T / h``) in one buffer allocated up front. Adjoint: given the stored
trajectory and ``lam(T)``, solve ``dlam/dt = -(df/dy)^T lam`` backward and return ``lam(0)``,
the gradient of a loss of ``y(T)`` with respect to ``y(0)``.

Example (the paper's Appendix A problem)::

    >>> import math, torch
    >>> from amaml_ext import ode
    >>> f = lambda t, y: -2 * t**3 - 2 * t * y
    >>> vjp = lambda t, y, v: -2 * t * v
    >>> traj = ode.solve_forward(f, torch.tensor([1.0], dtype=torch.float64), 1.0, 0.05)
    >>> yT = traj.states[-1]
    >>> lam0 = ode.solve_adjoint(vjp, traj, 6 * (yT - 3) ** 5, method="rk4")
    >>> exact = 6 * (yT - 3) ** 5 * math.exp(-1.0)
    >>> bool(torch.allclose(lam0, exact, rtol=1e-6))
    True

Callbacks receive ``y`` (and ``v``) as views into the solver's workspace: valid during the call
only. Clone them to keep them, and do not modify them in place.
"""

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch

from . import _C
from .accuracy import richardson

FORWARD_METHODS = ("dopri5", "rk4", "euler")
"""Forward methods: adaptive Dormand-Prince 5(4) with dense output onto the grid, and
fixed-step classical RK4 and explicit Euler on the grid."""

ADJOINT_METHODS = ("heun", "rk4", "discrete")
"""Adjoint methods: ``heun`` (the paper's backward modified Euler, order 2, two VJPs per
interval), ``rk4`` (backward classical RK4 over pairs of stored intervals, order 4, also two
VJPs per interval) and ``discrete`` (the exact reverse of ``euler``: one VJP per interval)."""

_FLOAT_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class SolverStats:
    """Counts of a forward solve."""

    function_evals: int
    accepted_steps: int
    rejected_steps: int
    initial_step: float


@dataclass(frozen=True)
class AdjointStats:
    """Counts of an adjoint solve."""

    vjp_evals: int
    steps: int
    error_estimate: Optional[float] = None
    """Step-doubling (Richardson) estimate of the relative error of ``lam(0)`` (max over tasks),
    with ``error_estimate=True`` and a continuous method; see :mod:`amaml_ext.accuracy`."""


@dataclass(frozen=True)
class Trajectory:
    """States of a forward solve on the grid.

    Attributes:
        times: ``[N+1]`` float64 grid times ``t_j = j h`` (``times[-1] == T``), on the CPU.
        states: ``[N+1, *y0.shape]`` states ``y(t_j)``, on ``y0``'s device and dtype.
        stats: :class:`SolverStats`.
        method: the forward method.
        batched: whether dimension 0 of a state indexes tasks.
    """

    times: torch.Tensor
    states: torch.Tensor
    stats: SolverStats
    method: str
    batched: bool = False

    @property
    def num_steps(self) -> int:
        """N, the number of grid intervals."""
        return self.times.numel() - 1

    @property
    def h(self) -> float:
        """The grid spacing T / N."""
        return float(self.times[-1]) / self.num_steps

    @property
    def T(self) -> float:
        return float(self.times[-1])


def _check_positive_real(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"argument '{name}' must be a real number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"argument '{name}' must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"argument '{name}' must be finite and > 0, got {value}")
    return value


def grid_size(T: float, h: float) -> int:
    """N = T / h, checked to be a whole number of steps (relative tolerance 1e-9).

    Raises ValueError naming ``T`` and ``h`` otherwise, or when ``h > T``.
    """
    T = _check_positive_real("T", T)
    h = _check_positive_real("h", h)
    if h > T * (1 + 1e-12):
        raise ValueError(f"argument 'h' must be <= T (the grid needs at least one step), got h={h}, T={T}")
    n = round(T / h)
    if n < 1 or abs(n * h - T) > 1e-9 * T:
        raise ValueError(
            f"T / h must be a whole number of steps, got T={T}, h={h} (T/h={T / h:.6g}); "
            f"e.g. h={T / max(1, n):.6g} gives N={max(1, n)}"
        )
    return int(n)


def _grid_times(T: float, n: int) -> torch.Tensor:
    times = torch.arange(n + 1, dtype=torch.float64) * (T / n)
    times[-1] = T
    return times


def _check_state(name: str, y: torch.Tensor, batched: bool) -> None:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"argument '{name}' must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"argument '{name}' must be float32 or float64, got {y.dtype}")
    if y.numel() == 0:
        raise ValueError(f"argument '{name}' must not be empty, got shape {tuple(y.shape)}")
    if batched and y.dim() < 2:
        raise ValueError(f"argument '{name}' must have shape [B, ...] with batched=True, got {tuple(y.shape)}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"argument '{name}' must be finite, got non-finite entries")


def _as_2d(y: torch.Tensor, batched: bool) -> torch.Tensor:
    flat = y.detach().reshape(y.shape[0], -1) if batched else y.detach().reshape(1, -1)
    return flat.contiguous()


# ---- row-range solves over the C++ drivers (what amaml_ext.metagrad builds on) ----------------
# States are [rows, d] (rows = tasks); `times` are the grid times of the rows solved, and `shape`
# is the shape the callbacks see.

def forward_rows(f, y: torch.Tensor, shape, times: torch.Tensor, method: str, rtol: float = 1e-6,
                 atol: float = 1e-8, max_steps: int = 10000):
    """Grid states ``[len(times), rows, d]`` from ``y`` at ``times[0]`` by ``method``, and the
    solver's counts."""
    if method == "dopri5":
        states, stats, _ = _C.dopri5_forward(f, y, list(shape), times, float(rtol), float(atol), int(max_steps), 0.0)
        return states, stats
    return _C.fixed_forward(f, y, list(shape), times, method)


def dopri5_logged(f, y: torch.Tensor, shape, times: torch.Tensor, rtol: float, atol: float, max_steps: int,
                  checkpoint_cap: int):
    """dopri5 without a stored trajectory: ``(final state, counts, log)``; the log (steps, which
    step wrote each grid row, at most ``checkpoint_cap`` step-start states) lets
    :func:`dopri5_replay_rows` recompute any grid rows bit for bit."""
    _, stats, log = _C.dopri5_forward(f, y, list(shape), times, float(rtol), float(atol), int(max_steps), 0.0,
                                      False, int(checkpoint_cap))
    return log["final"], stats, log


def dopri5_replay_rows(f, log, shape, lo: int, hi: int) -> torch.Tensor:
    """Grid rows ``lo..hi`` (of the logged solve) recomputed from the nearest checkpoint."""
    s_lo = 0 if lo == 0 else int(log["row_step"][lo])
    start = max(k for k in log["checkpoints"] if k <= s_lo)
    s_hi = int(log["row_step"][hi])
    return _C.dopri5_replay(f, log["checkpoints"][start], list(shape), log["step_t"], log["step_h"], start, s_hi,
                            log["row_step"], log["row_theta"], lo, hi)


def adjoint_rows(vjp, states: torch.Tensor, shape, times: torch.Tensor, lam: torch.Tensor, method: str,
                 coarse: Optional[torch.Tensor] = None, row0: int = 0, node=None):
    """The adjoint from ``times[-1]`` down to ``times[0]`` over ``states`` (``[len(times), rows,
    d]``): ``(lam at times[0], counts, coarse)``. ``coarse`` carries the step-doubling companion
    (:mod:`amaml_ext.accuracy`), ``row0`` is the absolute grid row of ``times[0]``, ``node(t, lam)``
    is called where lam is final at a node."""
    return _C.adjoint_solve(vjp, states, list(shape), times, lam, method, coarse, int(row0), node)


def solve_forward(f: Callable[[float, torch.Tensor], torch.Tensor], y0: torch.Tensor, T: float,
                  h: float, *, method: str = "dopri5", rtol: float = 1e-6, atol: float = 1e-8,
                  batched: bool = False, max_steps: Optional[int] = None,
                  initial_step: Optional[float] = None) -> Trajectory:
    """Solve ``dy/dt = f(t, y)``, ``y(0) = y0`` on ``[0, T]`` and store ``y`` at ``t_j = j h``.

    Args:
        f: ``f(t: float, y: Tensor) -> Tensor`` of ``y``'s shape, dtype and device.
        y0: initial state, any shape, float32 or float64, CPU or CUDA.
        T: horizon (> 0). h: grid spacing; ``T / h`` must be a whole number N.
        method: one of :data:`FORWARD_METHODS`. ``dopri5`` takes adaptive steps with
            tolerances ``rtol``/``atol`` (Hairer's step control) and writes the grid states by
            dense output; ``rk4`` and ``euler`` step on the grid itself.
        batched: ``y0`` is ``[B, ...]`` with B independent tasks; dopri5 then shares one step
            size and accepts a step only when every task's error norm is <= 1.
        max_steps: dopri5 step budget (accepted + rejected), default ``max(10000, 100 N)``.
        initial_step: dopri5 first step; default Hairer's automatic choice.

    Returns:
        :class:`Trajectory` with ``times [N+1]`` and ``states [N+1, *y0.shape]``.
    """
    if not callable(f):
        raise TypeError(f"argument 'f' must be callable f(t, y), got {type(f).__name__}")
    _check_state("y0", y0, batched)
    n = grid_size(T, h)
    T = float(T.item() if isinstance(T, torch.Tensor) else T)
    if method not in FORWARD_METHODS:
        raise ValueError(f"argument 'method' must be one of {FORWARD_METHODS}, got {method!r}")
    times = _grid_times(T, n)
    shape = list(y0.shape)
    y2 = _as_2d(y0, batched)
    with torch.no_grad():
        if method == "dopri5":
            rtol = float(rtol)
            atol = float(atol)
            if not (math.isfinite(rtol) and math.isfinite(atol) and rtol >= 0 and atol >= 0 and rtol + atol > 0):
                raise ValueError(f"arguments 'rtol' and 'atol' must be finite, >= 0 and not both 0, got rtol={rtol}, atol={atol}")
            if max_steps is None:
                max_steps = max(10000, 100 * n)
            if int(max_steps) < 1:
                raise ValueError(f"argument 'max_steps' must be >= 1, got {max_steps}")
            h0 = 0.0 if initial_step is None else _check_positive_real("initial_step", initial_step)
            states, stats, _ = _C.dopri5_forward(f, y2, shape, times, rtol, atol, int(max_steps), h0)
        else:
            states, stats = forward_rows(f, y2, shape, times, method)
    return Trajectory(times=times, states=states.view([n + 1] + shape), stats=SolverStats(**stats),
                      method=method, batched=batched)


def solve_adjoint(vjp: Callable[[float, torch.Tensor, torch.Tensor], torch.Tensor],
                  trajectory: Trajectory, lam_T: torch.Tensor, *, method: str = "heun",
                  return_stats: bool = False, error_estimate: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, AdjointStats]]:
    """Solve the adjoint ODE backward over a stored trajectory and return ``lam(0)``.

    Args:
        vjp: ``vjp(t: float, y: Tensor, v: Tensor) -> Tensor`` = ``(df/dy)(t, y)^T v``.
        trajectory: from :func:`solve_forward`.
        lam_T: ``dL/dy(T)``, shape of a state.
        method: one of :data:`ADJOINT_METHODS`. ``discrete`` is the exact gradient of the
            ``euler`` forward map; ``heun`` and ``rk4`` approximate the continuous adjoint
            with errors O(h^2) and O(h^4).
        return_stats: also return :class:`AdjointStats`.
        error_estimate: run the same scheme with twice the step alongside (one extra VJP per
            interval) and put the Richardson estimate of the relative error of ``lam(0)`` in the
            stats (``heun`` and ``rk4``; ignored for ``discrete``, which is exact for ``euler``).

    Returns:
        ``lam(0)`` with ``lam_T``'s shape (and the stats if asked).
    """
    if not callable(vjp):
        raise TypeError(f"argument 'vjp' must be callable vjp(t, y, v), got {type(vjp).__name__}")
    if not isinstance(trajectory, Trajectory):
        raise TypeError(f"argument 'trajectory' must be an amaml_ext.ode.Trajectory, got {type(trajectory).__name__}")
    if method not in ADJOINT_METHODS:
        raise ValueError(f"argument 'method' must be one of {ADJOINT_METHODS}, got {method!r}")
    state_shape = tuple(trajectory.states.shape[1:])
    _check_state("lam_T", lam_T, False)
    if tuple(lam_T.shape) != state_shape:
        raise ValueError(f"argument 'lam_T' must have the state's shape {state_shape}, got {tuple(lam_T.shape)}")
    if lam_T.dtype != trajectory.states.dtype or lam_T.device != trajectory.states.device:
        raise ValueError(
            f"argument 'lam_T' must match the trajectory's dtype and device "
            f"({trajectory.states.dtype}, {trajectory.states.device}), got ({lam_T.dtype}, {lam_T.device})"
        )
    n = trajectory.num_steps
    rows = state_shape[0] if trajectory.batched else 1
    traj3 = trajectory.states.reshape(n + 1, rows, -1)
    lam2 = _as_2d(lam_T, trajectory.batched)
    with torch.no_grad():
        coarse = lam2.clone() if error_estimate and method != "discrete" else None
        lam0, stats, coarse = adjoint_rows(vjp, traj3, state_shape, trajectory.times, lam2, method, coarse)
        if coarse is not None:
            stats["error_estimate"] = float(richardson(lam0, coarse, method).max())
    lam0 = lam0.view(state_shape)
    if return_stats:
        return lam0, AdjointStats(**stats)
    return lam0
