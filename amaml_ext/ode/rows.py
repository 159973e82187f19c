"""Row-range solves over the C++ drivers: what :mod:`amaml_ext.metagrad` builds on (segments of
the grid, phases of per-task horizons, checkpoints).

States are ``[rows, d]`` (rows = tasks); ``times`` are the grid times of the rows solved, and
``shape`` is the shape the callbacks see. No argument checks: the callers' own.
"""

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ..ops.core import C as _C
from .schemes import ADJOINT_SCHEMES, FORWARD_SCHEMES


def forward_rows(f, y: torch.Tensor, shape, times: torch.Tensor, method: str, rtol: float = 1e-6,
                 atol: float = 1e-8, max_steps: int = 10000):
    """Grid states ``[len(times), rows, d]`` from ``y`` at ``times[0]`` by ``method``, and the
    solver's counts.

    Args:
        f: ``f(t, y) -> dy/dt``, ``y`` of ``shape``.
        y: ``[rows, d]``, the state at ``times[0]``.
        shape: the shape ``f`` sees (``[d]``, or ``[rows, ...]`` for tasks).
        times: float64 grid times of the rows to solve (:func:`grid_times`).
        method: a forward method (:data:`FORWARD_METHODS`).
        rtol: dopri5's relative tolerance.
        atol: dopri5's absolute tolerance.
        max_steps: dopri5's step budget.

    Returns:
        ``(states, counts)``: ``[len(times), rows, d]`` and a dict of the solver's counts.

    Example:
        >>> import torch
        >>> from amaml_ext import ode
        >>> y = torch.ones(1, 2, dtype=torch.float64)
        >>> states, counts = ode.forward_rows(lambda t, y: -y, y, [2], ode.grid_times(1.0, 4), "euler")
        >>> states.shape, counts["function_evals"]
        (torch.Size([5, 1, 2]), 4)
    """
    return FORWARD_SCHEMES[method].driver(method, f, y, shape, times, rtol, atol, max_steps, 0.0)


@dataclass(frozen=True)
class Dopri5Log:
    """What an adaptive solve without a stored trajectory keeps to recompute its grid rows:
    ``checkpoints`` (step index -> the state at that step's start, at most the cap asked for),
    the steps' start times and sizes ``step_t``, ``step_h``, and for each grid row the step that
    wrote it and where inside it, ``row_step``, ``row_theta``.

    Example:
        >>> import torch
        >>> from amaml_ext import ode
        >>> y = torch.ones(1, 2, dtype=torch.float64)
        >>> _, _, log = ode.dopri5_logged(lambda t, y: -y, y, [2], ode.grid_times(1.0, 4), 1e-6, 1e-8, 1000, 2)
        >>> sorted(log.checkpoints), log.row_step.shape
        ([0, 4], torch.Size([5]))
    """

    checkpoints: Dict[int, torch.Tensor]
    step_t: torch.Tensor
    step_h: torch.Tensor
    row_step: torch.Tensor
    row_theta: torch.Tensor


def dopri5_logged(f, y: torch.Tensor, shape, times: torch.Tensor, rtol: float, atol: float, max_steps: int,
                  checkpoint_cap: int):
    """dopri5 without a stored trajectory: ``(final state, counts, Dopri5Log)``; the log lets
    :func:`dopri5_replay_rows` recompute any grid rows bit for bit.

    Args:
        f, y, shape, times, rtol, atol, max_steps: as :func:`forward_rows`.
        checkpoint_cap: the most step-start states the log keeps.

    Returns:
        ``(y at times[-1] [rows, d], counts, Dopri5Log)``.

    Example:
        >>> import math, torch
        >>> from amaml_ext import ode
        >>> y = torch.ones(1, 1, dtype=torch.float64)
        >>> final, counts, log = ode.dopri5_logged(lambda t, y: -y, y, [1], ode.grid_times(1.0, 4),
        ...                                        1e-6, 1e-8, 1000, 2)
        >>> abs(float(final) - math.exp(-1)) < 1e-6
        True
    """
    _, stats, raw = _C.dopri5_forward(f, y, list(shape), times, float(rtol), float(atol), int(max_steps), 0.0,
                                      False, int(checkpoint_cap))
    log = Dopri5Log(checkpoints=dict(raw["checkpoints"]), step_t=raw["step_t"], step_h=raw["step_h"],
                    row_step=raw["row_step"], row_theta=raw["row_theta"])
    return raw["final"], stats, log


def dopri5_replay_rows(f, log: Dopri5Log, shape, lo: int, hi: int) -> torch.Tensor:
    """Grid rows ``lo..hi`` (inclusive, of the logged solve) recomputed from the nearest
    checkpoint: ``[hi - lo + 1, rows, d]``, bit for bit those the stored solve would hold.

    Example:
        >>> import torch
        >>> from amaml_ext import ode
        >>> f, y, times = (lambda t, y: -y), torch.ones(1, 2, dtype=torch.float64), ode.grid_times(1.0, 4)
        >>> _, _, log = ode.dopri5_logged(f, y, [2], times, 1e-6, 1e-8, 1000, 2)
        >>> stored, _ = ode.forward_rows(f, y, [2], times, "dopri5")
        >>> torch.equal(ode.dopri5_replay_rows(f, log, [2], 1, 3), stored[1:4])
        True
    """
    s_lo = 0 if lo == 0 else int(log.row_step[lo])
    start = max(k for k in log.checkpoints if k <= s_lo)
    s_hi = int(log.row_step[hi])
    return _C.dopri5_replay(f, log.checkpoints[start], list(shape), log.step_t, log.step_h, start, s_hi,
                            log.row_step, log.row_theta, lo, hi)


@dataclass(frozen=True)
class Midpoint:
    """The state halfway between grid rows ``row`` and ``row + 1`` (interpolated: the RK4
    adjoint's odd top interval evaluates there twice): how :func:`adjoint_rows` names such a
    state to its ``vjp``.

    Example:
        >>> import torch
        >>> from amaml_ext import ode
        >>> times, y = ode.grid_times(0.75, 3), torch.ones(1, 2, dtype=torch.float64)
        >>> states, _ = ode.forward_rows(lambda t, y: -y, y, [2], times, "rk4")
        >>> rows = []
        >>> _ = ode.adjoint_rows(lambda row, y, v: rows.append(row) or -v, states, [2], times, y, "rk4")
        >>> rows[:3]
        [3, Midpoint(row=2), Midpoint(row=2)]
    """

    row: int


def _row_namer(times: torch.Tensor, row0: int):
    """``t -> row`` for the times the drivers call back at: a grid time gives its absolute row (an
    int), the midpoint of an interval a :class:`Midpoint`. Both are the exact doubles the drivers
    computed from ``times``, so the lookup is exact."""
    ts = times.tolist()
    names = {t: row0 + j for j, t in enumerate(ts)}
    for j in range(len(ts) - 1):
        names.setdefault(0.5 * (ts[j] + ts[j + 1]), Midpoint(row0 + j))
    return names.__getitem__


def adjoint_rows(vjp, states: torch.Tensor, shape, times: torch.Tensor, lam: torch.Tensor, method: str,
                 coarse: Optional[torch.Tensor] = None, row0: int = 0, node=None):
    """The adjoint from ``times[-1]`` down to ``times[0]`` over ``states`` (``[len(times), rows,
    d]``): ``(lam at times[0], counts, coarse)``. ``coarse`` carries the step-doubling companion
    (:func:`~amaml_ext.ode.schemes.richardson`), ``row0`` is the absolute grid row of ``times[0]``.

    The callbacks name a state by its absolute grid row (or a :class:`Midpoint`), not by its
    time: ``vjp(row, y, v)``, and ``node(row, lam)`` where lam is final at a grid node.

    Args:
        vjp: ``vjp(row, y, v) -> (df/dy)^T v`` at the state of ``row``.
        states: ``[len(times), rows, d]`` from :func:`forward_rows`.
        shape: the shape the callbacks see.
        times: the rows' grid times.
        lam: ``[rows, d]``, the adjoint at ``times[-1]``.
        method: an adjoint method (:data:`ADJOINT_METHODS`).
        coarse: ``[rows, d]`` start of the step-doubling companion, or None.
        row0: the absolute grid row of ``times[0]``.
        node: optional ``node(row, lam)`` at each grid node.

    Returns:
        ``(lam at times[0] [rows, d], counts, coarse)``.

    Example:
        >>> import math, torch
        >>> from amaml_ext import ode
        >>> times, y = ode.grid_times(1.0, 100), torch.ones(1, 1, dtype=torch.float64)
        >>> states, _ = ode.forward_rows(lambda t, y: -y, y, [1], times, "rk4")
        >>> lam0, counts, _ = ode.adjoint_rows(lambda row, y, v: -v, states, [1], times, y, "heun")
        >>> abs(float(lam0) - math.exp(-1)) < 1e-5, counts["steps"]
        (True, 100)
    """
    name = _row_namer(times, row0)
    by_row = (lambda t, y, v: vjp(name(t), y, v))
    on_node = None if node is None else (lambda t, lam_: node(name(t), lam_))
    return ADJOINT_SCHEMES[method].driver(method, by_row, states, shape, times, lam, coarse, row0, on_node)
