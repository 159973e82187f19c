"""Whole adaptive DOPRI5 solves: ``amaml_ext.ode.solve_forward(method="dopri5")`` vs
``torchdiffeq.odeint(method="dopri5")`` on the same ODE, tolerances (rtol=1e-6, atol=1e-8) and
output grid ``t = linspace(0, T, N+1)``, float64.

Cases:

* ``appendixA``: the paper's Appendix A problem dy/dt = -2 t^3 - 2 t y, y(0) = 1, T = 2,
  grid h = 0.01 (N = 200). Exact solution y = 1 - t^2.
* ``linear-1e4``, ``linear-1e6``: dy/dt = -a * y + sin(t), y in R^d, a = 0.5 + U(0, 1) (fixed
  seed), y(0) ~ N(0, 1), T = 2, grid h = 0.05 (N = 40: the stored trajectory of d = 1e6 is
  then 320 MB per solver, not 1.6 GB, which keeps the run short). Exact solution
  y = (y0 + 1/(1+a^2)) e^{-a t} + (a sin t - cos t) / (1 + a^2).

Each solver is timed in its own benchmark (group ``dopri5 <case> <device>``). Before timing, both
solvers run once untimed with f wrapped in a call counter, and ``extra_info`` records for the
timed solver: ``nfe`` (calls of f counted by the wrapper), ``accepted_steps`` and
``rejected_steps`` (ours: ``traj.stats``; torchdiffeq: its accept/reject step callbacks),
``max_abs_diff`` (max over the grid of |ours - torchdiffeq|), ``max_abs_err`` (vs the exact
solution) and, after timing, ``time_per_step_s`` (median time / accepted steps).
"""

import functools
import math

import pytest
import torch

from amaml_ext import ode

from .common.params import DEVICES
from .common.timing import sync, timed

torchdiffeq = pytest.importorskip("torchdiffeq")

DTYPE = torch.float64
RTOL, ATOL = 1e-6, 1e-8
T = 2.0

CASES = {
    # name: (d or None for the scalar problem, grid h, rounds, warmup rounds)
    "appendixA": (None, 0.01, 20, 1),
    "linear-1e4": (10 ** 4, 0.05, 10, 1),
    "linear-1e6": (10 ** 6, 0.05, 3, 0),  # warmed up by the untimed run
}
SOLVERS = ["amaml", "torchdiffeq"]


class Counted:
    """f(t, y) with call, accepted-step and rejected-step counters (torchdiffeq calls the
    ``callback_*`` methods of the function object it is given)."""

    def __init__(self, f):
        self.f = f
        self.calls = self.accepted = self.rejected = 0

    def __call__(self, t, y):
        self.calls += 1
        return self.f(t, y)

    def callback_accept_step(self, t0, y0, dt):
        self.accepted += 1

    def callback_reject_step(self, t0, y0, dt):
        self.rejected += 1


def _problem(case: str, device: str):
    """(f, y0, exact(t_grid) -> [N+1, *y0.shape])."""
    d = CASES[case][0]
    if d is None:
        def f(t, y):
            return -2 * t ** 3 - 2 * t * y

        y0 = torch.ones(1, dtype=DTYPE, device=device)

        def exact(t):
            return (1 - t ** 2).unsqueeze(-1)

        return f, y0, exact
    g = torch.Generator(device="cpu").manual_seed(2023)
    a = (0.5 + torch.rand(d, generator=g, dtype=DTYPE)).to(device)
    y0 = torch.randn(d, generator=g, dtype=DTYPE).to(device)

    def f(t, y):
        # ours passes t as a Python float, torchdiffeq as a 0-d tensor on y's device
        s = math.sin(t) if isinstance(t, float) else torch.sin(t)
        return s - a * y

    def exact(t):
        t = t.unsqueeze(-1)
        inv = 1.0 / (1.0 + a * a)
        return (y0 + inv) * torch.exp(-a * t) + (a * torch.sin(t) - torch.cos(t)) * inv

    return f, y0, exact


def _grid(h: float, device: str) -> torch.Tensor:
    n = ode.grid_size(T, h)
    return torch.linspace(0.0, T, n + 1, dtype=DTYPE, device=device)


def _run(solver: str, f, y0, t_grid):
    if solver == "amaml":
        h = T / (t_grid.numel() - 1)
        return ode.solve_forward(f, y0, T, h, method="dopri5", rtol=RTOL, atol=ATOL)
    return torchdiffeq.odeint(f, y0, t_grid, rtol=RTOL, atol=ATOL, method="dopri5")


@functools.lru_cache(maxsize=None)
def _untimed_stats(case: str, device: str):
    """Solve once with each solver (counting f calls) and compare the solutions."""
    f, y0, exact = _problem(case, device)
    t_grid = _grid(CASES[case][1], device)
    ref = exact(t_grid)
    out = {}
    cf = Counted(f)
    traj = _run("amaml", cf, y0, t_grid)
    ours = traj.states
    out["amaml"] = dict(nfe=cf.calls, accepted_steps=traj.stats.accepted_steps,
                        rejected_steps=traj.stats.rejected_steps,
                        solver_nfe=traj.stats.function_evals,
                        max_abs_err=float((ours - ref).abs().max()))
    cf = Counted(f)
    theirs = _run("torchdiffeq", cf, y0, t_grid)
    out["torchdiffeq"] = dict(nfe=cf.calls, accepted_steps=cf.accepted, rejected_steps=cf.rejected,
                              max_abs_err=float((theirs - ref).abs().max()))
    diff = float((ours - theirs).abs().max())
    for s in SOLVERS:
        out[s]["max_abs_diff"] = diff
    return out


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_dopri5(benchmark, device, case, solver):
    d, h, rounds, warmup = CASES[case]
    stats = _untimed_stats(case, device)[solver]
    if solver == "amaml":
        assert stats["nfe"] == stats["solver_nfe"], "f call count disagrees with traj.stats"
    f, y0, _ = _problem(case, device)
    t_grid = _grid(h, device)
    benchmark.group = f"dopri5 {case} {device}"
    benchmark.extra_info.update(kind="dopri5", case=case, solver=solver, device=device,
                                d=d or 1, dtype=str(DTYPE).replace("torch.", ""), rtol=RTOL,
                                atol=ATOL, T=T, h=h, **stats)
    sync(device)
    benchmark.pedantic(timed(lambda: _run(solver, f, y0, t_grid), device), rounds=rounds,
                       iterations=1, warmup_rounds=warmup)
    if benchmark.stats is not None:  # None with --benchmark-disable (each function run once)
        median = benchmark.stats.stats.median
        benchmark.extra_info["time_per_step_s"] = median / max(1, stats["accepted_steps"])
