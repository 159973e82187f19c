"""The name -> scheme registry of the ODE solvers (like torchdiffeq's ``SOLVERS``): for every
forward and adjoint method, its order, its stability bound, and the C++ driver that runs it.

The drivers look the fixed-step and adjoint schemes up by name in their own step tables
(``csrc/solvers/fixed.cpp``, ``csrc/solvers/adjoint.cpp``); ``python_tests/ode/test_registry.py`` checks
that those tables and this registry agree (names, spans, companion strides). Everything else that depends on a
scheme (the methods accepted by :func:`~amaml_ext.ode.solve_forward`,
:func:`~amaml_ext.adjoint_meta_grad` and the command line, the orders and bounds of
:mod:`amaml_ext.metagrad.accuracy`) reads this registry.
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from ..ops.core import C as _C


def _dopri5_forward(method, f, y, shape, times, rtol, atol, max_steps, initial_step):
    states, stats, _ = _C.dopri5_forward(f, y, list(shape), times, float(rtol), float(atol), int(max_steps),
                                         float(initial_step))
    return states, stats


def _fixed_forward(method, f, y, shape, times, rtol, atol, max_steps, initial_step):
    return _C.fixed_forward(f, y, list(shape), times, method)


def _adjoint_solve(method, vjp, states, shape, times, lam, coarse, row0, node):
    return _C.adjoint_solve(vjp, states, list(shape), times, lam, method, coarse, int(row0), node)


RK4_BOUND = 2.785293563405282
"""The classical RK4 method is stable on ``y' = -lambda y`` for ``step * lambda`` up to this
value (the real root of ``z^3 - 4 z^2 + 12 z - 24``, where ``|R(-z)| = 1``)."""


@dataclass(frozen=True)
class Scheme:
    """One forward or adjoint method: everything that depends on the method is read from here.

    Attributes:
        name: the ``method`` argument that selects it.
        order: p, the error being O(h^p) (``discrete``: against the continuous adjoint; it is the
            exact gradient of ``euler``'s map).
        step_bound: the largest ``step * lambda`` on the negative real axis for which one step of
            the scheme is stable on ``y' = -lambda y``; None for ``dopri5``, which chooses its own
            steps.
        driver: ``driver(name, ...)`` runs it. Forward:
            ``(name, f, y, shape, times, rtol, atol, max_steps, initial_step) -> (states, counts)``
            (fixed-step schemes ignore the last four). Adjoint:
            ``(name, vjp, states, shape, times, lam, coarse, row0, node) -> (lam, counts, coarse)``.
        summary: what it is, in a line.
        span: grid intervals one step covers (the RK4 adjoint steps over pairs: 2).
        adaptive: it takes its own steps (rtol/atol, dense output onto the grid).
        coarse_stride: (adjoint) grid intervals per step of the step-doubling companion that can
            run alongside (:func:`richardson`); 0: none.
        quadrature_order: (adjoint) the order of the quadrature over the adjoint's nodes that
            integrates the sensitivities of ``gradient_flow``'s other inputs (trapezoid 2,
            Simpson 4); None for an exact adjoint, which sums them at its own VJPs.
        exact_for: (adjoint) the forward method whose steps it reverses exactly (``discrete``:
            ``euler``), and the only one it may be paired with; None for a continuous adjoint.
        grid_stages: (forward) every evaluation of ``f`` is at a grid state, once per row
            (``euler``): the forward's linearisations there are the adjoint's, and can be kept
            for it (``memory="linearise"``).

    Example:
        >>> from amaml_ext import ode
        >>> s = ode.ADJOINT_SCHEMES["rk4"]
        >>> s.order, s.span, round(s.stability_bound, 3), s.error_estimate, s.exact_for
        (4, 2, 1.393, True, None)
        >>> ode.ADJOINT_SCHEMES["discrete"].exact_for
        'euler'
    """

    name: str
    order: int
    step_bound: Optional[float]
    driver: Callable
    summary: str
    span: int = 1
    adaptive: bool = False
    coarse_stride: int = 0
    quadrature_order: Optional[int] = None
    exact_for: Optional[str] = None
    grid_stages: bool = False

    @property
    def stability_bound(self) -> Optional[float]:
        """The bound in ``h * lambda`` with h the grid spacing: the bound of one step over ``span``."""
        return None if self.step_bound is None else self.step_bound / self.span

    @property
    def error_estimate(self) -> bool:
        """(adjoint) whether the step-doubling companion can run alongside."""
        return self.coarse_stride > 0


def _registry(*schemes: Scheme) -> Dict[str, Scheme]:
    return {s.name: s for s in schemes}


FORWARD_SCHEMES = _registry(
    Scheme("dopri5", 5, None, _dopri5_forward, "adaptive Dormand-Prince 5(4), dense output onto the grid",
           adaptive=True),
    Scheme("rk4", 4, RK4_BOUND, _fixed_forward, "classical RK4 on the grid"),
    Scheme("euler", 1, 2.0, _fixed_forward, "explicit Euler on the grid (for a gradient flow: gradient descent)",
           grid_stages=True),
)
"""Forward methods by name."""

ADJOINT_SCHEMES = _registry(
    Scheme("heun", 2, 2.0, _adjoint_solve, "backward Heun (the paper's modified Euler), two VJPs per interval",
           coarse_stride=2, quadrature_order=2),
    Scheme("rk4", 4, RK4_BOUND, _adjoint_solve, "backward classical RK4 over pairs of stored intervals, "
           "two VJPs per interval", span=2, coarse_stride=4, quadrature_order=4),
    Scheme("discrete", 1, 2.0, _adjoint_solve, "the exact reverse of euler, one VJP per interval",
           exact_for="euler"),
)
"""Adjoint methods by name."""

FORWARD_METHODS = tuple(FORWARD_SCHEMES)
"""Forward methods: adaptive Dormand-Prince 5(4) with dense output onto the grid, and
fixed-step classical RK4 and explicit Euler on the grid."""

ADJOINT_METHODS = tuple(ADJOINT_SCHEMES)
"""Adjoint methods: ``heun`` (the paper's backward modified Euler, order 2, two VJPs per
interval), ``rk4`` (backward classical RK4 over pairs of stored intervals, order 4, also two
VJPs per interval) and ``discrete`` (the exact reverse of ``euler``: one VJP per interval)."""


def check_pairing(solver: str, adjoint: str) -> None:
    """Check that an adjoint method may follow a forward method.

    An exact adjoint (``exact_for``) is the reverse of its forward's steps and of nothing else:
    with another forward it is neither that method's gradient nor the flow's (``discrete`` after
    ``rk4`` or ``dopri5``: 7-13% off on the paper's MLP at h = 0.2), and no error estimate covers it.

    Args:
        solver: a forward method (:data:`FORWARD_METHODS`).
        adjoint: an adjoint method (:data:`ADJOINT_METHODS`).

    Raises:
        ValueError: ``adjoint`` is exact for another forward method.

    Example:
        >>> check_pairing("dopri5", "heun")          # a continuous adjoint follows any forward
        >>> check_pairing("rk4", "discrete")
        Traceback (most recent call last):
        ...
        ValueError: argument 'adjoint': 'discrete' is the exact gradient of solver='euler' ...
    """
    pair = ADJOINT_SCHEMES[adjoint].exact_for
    if pair is not None and solver != pair:
        raise ValueError(f"argument 'adjoint': {adjoint!r} is the exact gradient of solver={pair!r} (T/h GD steps) "
                         f"and must be paired with it, got solver={solver!r}; for {solver!r} use a continuous "
                         f"adjoint ({continuous_adjoints()}), which carries an error estimate")


def continuous_adjoints() -> str:
    """The continuous adjoint methods, in words, for messages.

    Example:
        >>> continuous_adjoints()
        "'heun' or 'rk4'"
    """
    return " or ".join(repr(n) for n, s in ADJOINT_SCHEMES.items() if s.exact_for is None)


def grid_forwards() -> List[str]:
    """The forward methods that step on the grid (not adaptive).

    Example:
        >>> grid_forwards()
        ['rk4', 'euler']
    """
    return [n for n, s in FORWARD_SCHEMES.items() if not s.adaptive]


def default_max_steps(n: int) -> int:
    """An adaptive solve's default step budget (accepted + rejected) for ``n`` grid intervals, for
    the ODE API and the meta-gradient alike: ten steps per interval, at least 1000. dopri5
    collapsing on a non-smooth loss (ReLU, max-pool) then stops in seconds with an error naming
    ``max_steps`` and the fix, instead of running for hours; a stiff problem that needs more
    passes ``max_steps`` (``ode.solve_forward`` allowed 100 per interval before the two defaults
    were made one).

    Args:
        n: the number of grid intervals N.

    Returns:
        int: ``max(1000, 10 n)``.

    Example:
        >>> default_max_steps(50), default_max_steps(500)
        (1000, 5000)
    """
    return max(1000, 10 * n)


def _by_name(field: str) -> Dict[str, float]:
    """``field`` of every scheme by name; a name that is both a forward and an adjoint method
    (``rk4``) must have one value."""
    out: Dict[str, float] = {}
    for s in (*FORWARD_SCHEMES.values(), *ADJOINT_SCHEMES.values()):
        value = getattr(s, field)
        if value is not None and out.setdefault(s.name, value) != value:
            raise ValueError(f"scheme {s.name!r}: its forward and adjoint {field} differ")
    return out


ORDERS = _by_name("order")
"""Order of each scheme, forward and adjoint."""

STABILITY_BOUNDS = {kind: {name: s.stability_bound for name, s in schemes.items() if s.stability_bound is not None}
                    for kind, schemes in (("forward", FORWARD_SCHEMES), ("adjoint", ADJOINT_SCHEMES))}
"""Stability bound in ``h * lambda`` (h the grid spacing) of each fixed-step scheme, by kind:
``STABILITY_BOUNDS["forward"]``: explicit Euler 2, classical RK4 about 2.785;
``STABILITY_BOUNDS["adjoint"]``: Heun and discrete 2, RK4 about 1.393 (its steps span two
intervals, 2h). dopri5 chooses its own steps and has none."""


def richardson(lam: torch.Tensor, lam_coarse: torch.Tensor, method: str) -> torch.Tensor:
    """Per-row relative error estimate ``|lam - lam_c| / (2^p - 1) / |lam|`` of an adjoint solve
    ``lam`` from its step-doubling companion ``lam_c``, p the order of ``method``.

    Args:
        lam: ``[rows, d]``, the solve on the grid.
        lam_coarse: ``[rows, d]``, the same solve with twice the step.
        method: the adjoint method (its order p from :data:`ORDERS`).

    Returns:
        torch.Tensor: ``[rows]`` (inf where ``lam`` is 0 and the two differ, 0 where both are 0).

    Example:
        >>> import torch
        >>> richardson(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.3, 0.0]]), "heun")
        tensor([0.1000])
    """
    p = ORDERS[method]
    num = (lam - lam_coarse).norm(dim=-1) / (2 ** p - 1)
    den = lam.norm(dim=-1)
    tiny = torch.finfo(lam.dtype).tiny
    return torch.where(den > tiny, num / den.clamp_min(tiny), torch.where(num > 0, torch.full_like(num, math.inf), num))
