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
    >>> bool(torch.allclose(lam0, exact, rtol=1e-5))
    True

Callbacks receive ``y`` (and ``v``) as views into the solver's workspace: valid during the call
only. Clone them to keep them, and do not modify them in place.

Modules: :mod:`~amaml_ext.ode.schemes` (the name -> scheme registry: orders, stability bounds,
drivers), :mod:`~amaml_ext.ode.solve` (``solve_forward``, ``solve_adjoint``, ``Trajectory``),
:mod:`~amaml_ext.ode.rows` (row-range solves for :mod:`amaml_ext.metagrad`),
:mod:`~amaml_ext.ode.grid` (the grid).
"""

from .grid import grid_size, grid_times
from .rows import Dopri5Log, Midpoint, adjoint_rows, dopri5_logged, dopri5_replay_rows, forward_rows
from .schemes import (ADJOINT_METHODS, ADJOINT_SCHEMES, FORWARD_METHODS, FORWARD_SCHEMES, ORDERS, STABILITY_BOUNDS,
                      Scheme, check_pairing, continuous_adjoints, default_max_steps, grid_forwards, richardson)
from .solve import AdjointStats, SolverStats, Trajectory, solve_adjoint, solve_forward

__all__ = ["ADJOINT_METHODS", "ADJOINT_SCHEMES", "AdjointStats", "FORWARD_METHODS", "Dopri5Log", "FORWARD_SCHEMES", "Midpoint", "ORDERS",
           "STABILITY_BOUNDS", "Scheme", "SolverStats", "Trajectory", "adjoint_rows", "check_pairing", "continuous_adjoints", "default_max_steps", "grid_forwards", "dopri5_logged",
           "dopri5_replay_rows", "forward_rows", "grid_size", "grid_times", "richardson", "solve_adjoint",
           "solve_forward"]
