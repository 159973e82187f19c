"""solve_forward / solve_adjoint: the ODE API over the C++ solver drivers, with the checks of
every argument, and the trajectory and counts they return."""

from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch

from .._checks import choice, integer, positive_real, tolerances
from .grid import grid_size, grid_times
from .rows import Midpoint, adjoint_rows
from .schemes import ADJOINT_METHODS, ADJOINT_SCHEMES, FORWARD_METHODS, FORWARD_SCHEMES, default_max_steps, richardson

_FLOAT_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class SolverStats:
    """Counts of a forward solve (:attr:`Trajectory.stats`).

    Attributes:
        function_evals: evaluations of ``f``.
        accepted_steps: steps taken (fixed-step methods: N).
        rejected_steps: steps dopri5 rejected (0 for the fixed-step methods).
        initial_step: dopri5's first step (the grid spacing h for the others).

    Example:
        >>> import torch
        >>> from amaml_ext import ode
        >>> traj = ode.solve_forward(lambda t, y: -y, torch.ones(2), 1.0, 0.25, method="rk4")
        >>> traj.stats.function_evals, traj.stats.accepted_steps, traj.stats.rejected_steps
        (16, 4, 0)
    """

    function_evals: int
    accepted_steps: int
    rejected_steps: int
    initial_step: float


@dataclass(frozen=True)
class AdjointStats:
    """Counts of an adjoint solve (:func:`solve_adjoint` with ``return_stats=True``).

    Attributes:
        vjp_evals: evaluations of ``vjp`` (the step-doubling companion's included).
        steps: adjoint steps taken.
        error_estimate: see below; None unless asked for.

    Example:
        >>> import torch
        >>> from amaml_ext import ode
        >>> traj = ode.solve_forward(lambda t, y: -y, torch.ones(2), 1.0, 0.25, method="rk4")
        >>> lam0, st = ode.solve_adjoint(lambda t, y, v: -v, traj, torch.ones(2), return_stats=True)
        >>> st.vjp_evals, st.steps, st.error_estimate
        (8, 4, None)
    """

    vjp_evals: int
    steps: int
    error_estimate: Optional[float] = None
    """Step-doubling (Richardson) estimate of the relative error of ``lam(0)`` (max over tasks),
    with ``error_estimate=True`` and a continuous method; see :func:`~amaml_ext.ode.schemes.richardson`
    and :mod:`amaml_ext.metagrad.accuracy`."""


@dataclass(frozen=True)
class Trajectory:
    """States of a forward solve on the grid.

    Attributes:
        times: ``[N+1]`` float64 grid times ``t_j = j h`` (``times[-1] == T``), on the CPU.
        states: ``[N+1, *y0.shape]`` states ``y(t_j)``, on ``y0``'s device and dtype.
        stats: :class:`SolverStats`.
        method: the forward method.
        batched: whether dimension 0 of a state indexes tasks.

    Example:
        >>> import torch
        >>> from amaml_ext import ode
        >>> traj = ode.solve_forward(lambda t, y: -y, torch.ones(3), 1.0, 0.25)
        >>> traj.states.shape, traj.num_steps, traj.h, traj.T
        (torch.Size([5, 3]), 4, 0.25, 1.0)
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
        """The horizon, ``times[-1]``."""
        return float(self.times[-1])


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


def _adaptive_options(rtol, atol, max_steps, initial_step, n: int) -> Tuple[float, float, int, float]:
    """dopri5's checked ``(rtol, atol, max_steps, initial_step)``; ``max_steps`` defaults to
    :func:`~amaml_ext.ode.schemes.default_max_steps`, ``initial_step`` to 0 (Hairer's automatic choice)."""
    rtol, atol = tolerances(rtol, atol)
    max_steps = default_max_steps(n) if max_steps is None else integer("max_steps", max_steps)
    h0 = 0.0 if initial_step is None else positive_real("initial_step", initial_step)
    return rtol, atol, max_steps, h0


def solve_forward(f: Callable[[float, torch.Tensor], torch.Tensor], y0: torch.Tensor, T: float,
                  h: float, *, method: str = "dopri5", rtol: float = 1e-6, atol: float = 1e-8,
                  batched: bool = False, max_steps: Optional[int] = None,
                  initial_step: Optional[float] = None) -> Trajectory:
    """Solve ``dy/dt = f(t, y)``, ``y(0) = y0`` on ``[0, T]`` and store ``y`` at ``t_j = j h``.

    Args:
        f: ``f(t: float, y: Tensor) -> Tensor`` of ``y``'s shape, dtype and device.
        y0: initial state, any shape, float32 or float64, CPU or CUDA, finite and not empty.
        T: horizon (> 0).
        h: grid spacing; ``T / h`` must be a whole number N (:func:`grid_size`).
        method: one of :data:`FORWARD_METHODS` (default ``"dopri5"``). ``dopri5`` takes
            adaptive steps with tolerances ``rtol``/``atol`` (Hairer's step control) and writes the
            grid states by dense output; ``rk4`` and ``euler`` step on the grid itself.
        rtol: dopri5's relative tolerance, in (0, 1) (default 1e-6).
        atol: dopri5's absolute tolerance, > 0 (default 1e-8).
        batched: ``y0`` is ``[B, ...]`` with B independent tasks; dopri5 then shares one step
            size and accepts a step only when every task's error norm is <= 1.
        max_steps: dopri5 step budget (accepted + rejected), default ``max(1000, 10 N)`` (:func:`~amaml_ext.ode.default_max_steps`).
        initial_step: dopri5 first step; default Hairer's automatic choice.

    Returns:
        Trajectory: ``times [N+1]`` and ``states [N+1, *y0.shape]`` (``y0``'s dtype and device).

    Raises:
        TypeError: ``f`` is not callable, ``y0`` is not a float32/float64 tensor.
        ValueError: ``y0`` is empty or not finite (or not ``[B, ...]`` with ``batched``), ``T / h``
            is not whole, an unknown ``method`` or bad tolerances; dopri5 ran out of ``max_steps``
            or its step underflowed (naming the time reached).

    Example:
        >>> import torch
        >>> from amaml_ext import ode
        >>> traj = ode.solve_forward(lambda t, y: -y, torch.ones(2, dtype=torch.float64), 1.0, 0.5)
        >>> traj.times
        tensor([0.0000, 0.5000, 1.0000], dtype=torch.float64)
        >>> torch.allclose(traj.states[-1], torch.tensor(-1.0, dtype=torch.float64).exp())   # y(1) = exp(-1)
        True
    """
    if not callable(f):
        raise TypeError(f"argument 'f' must be callable f(t, y), got {type(f).__name__}")
    _check_state("y0", y0, batched)
    n = grid_size(T, h)
    T = float(T.item() if isinstance(T, torch.Tensor) else T)
    choice("method", method, FORWARD_METHODS)
    times = grid_times(T, n)
    shape = list(y0.shape)
    y2 = _as_2d(y0, batched)
    scheme = FORWARD_SCHEMES[method]
    with torch.no_grad():
        options = _adaptive_options(rtol, atol, max_steps, initial_step, n) if scheme.adaptive else (
            rtol, atol, max_steps, 0.0)
        states, stats = scheme.driver(method, f, y2, shape, times, *options)
    return Trajectory(times=times, states=states.view([n + 1] + shape), stats=SolverStats(**stats),
                      method=method, batched=batched)


def _time(times: torch.Tensor, row) -> float:
    """The time of a grid row or a :class:`~amaml_ext.ode.rows.Midpoint` (the drivers' own double)."""
    if isinstance(row, Midpoint):
        return 0.5 * (float(times[row.row]) + float(times[row.row + 1]))
    return float(times[row])


def solve_adjoint(vjp: Callable[[float, torch.Tensor, torch.Tensor], torch.Tensor],
                  trajectory: Trajectory, lam_T: torch.Tensor, *, method: str = "heun",
                  return_stats: bool = False, error_estimate: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, AdjointStats]]:
    """Solve the adjoint ODE backward over a stored trajectory and return ``lam(0)``.

    Args:
        vjp: ``vjp(t: float, y: Tensor, v: Tensor) -> Tensor`` = ``(df/dy)(t, y)^T v``.
        trajectory: from :func:`solve_forward`.
        lam_T: ``dL/dy(T)``, shape, dtype and device of a state, finite.
        method: one of :data:`ADJOINT_METHODS` (default ``"heun"``). ``discrete`` is the exact gradient of the
            ``euler`` forward map; ``heun`` and ``rk4`` approximate the continuous adjoint
            with errors O(h^2) and O(h^4).
        return_stats: also return :class:`AdjointStats`.
        error_estimate: run the same scheme with twice the step alongside (one extra VJP per
            interval) and put the Richardson estimate of the relative error of ``lam(0)`` in the
            stats (``heun`` and ``rk4``; ignored for ``discrete``, which is exact for ``euler``).

    Returns:
        ``lam(0)`` with ``lam_T``'s shape, or ``(lam(0), AdjointStats)`` with ``return_stats``.

    Raises:
        TypeError: ``vjp`` is not callable, ``trajectory`` not a :class:`Trajectory`, ``lam_T`` not
            a float tensor.
        ValueError: an unknown ``method``; ``lam_T`` not finite, or of another shape, dtype or
            device than the states.

    Example:
        >>> import math, torch
        >>> from amaml_ext import ode
        >>> traj = ode.solve_forward(lambda t, y: -y, torch.ones(1, dtype=torch.float64), 1.0, 0.01)
        >>> lam0 = ode.solve_adjoint(lambda t, y, v: -v, traj, torch.ones(1, dtype=torch.float64))
        >>> abs(float(lam0) - math.exp(-1.0)) < 1e-5         # d y(1) / d y(0) = exp(-1)
        True
    """
    if not callable(vjp):
        raise TypeError(f"argument 'vjp' must be callable vjp(t, y, v), got {type(vjp).__name__}")
    if not isinstance(trajectory, Trajectory):
        raise TypeError(f"argument 'trajectory' must be an amaml_ext.ode.Trajectory, got {type(trajectory).__name__}")
    choice("method", method, ADJOINT_METHODS)
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
        coarse = lam2.clone() if error_estimate and ADJOINT_SCHEMES[method].error_estimate else None
        lam0, stats, coarse = adjoint_rows(lambda r, y, v: vjp(_time(trajectory.times, r), y, v), traj3, state_shape,
                                           trajectory.times, lam2, method, coarse)
        if coarse is not None:
            stats["error_estimate"] = float(richardson(lam0, coarse, method).max())
    lam0 = lam0.view(state_shape)
    if return_stats:
        return lam0, AdjointStats(**stats)
    return lam0
