"""The scheme registry (amaml_ext.ode.schemes) is the single source of what depends on a scheme:
no branch on a scheme's name elsewhere in the package, its derived numbers from its own fields,
and row indices (not float times) in the callbacks of the row-range solves."""

import ast
import os

import pytest
import torch

from amaml_ext import ode
from amaml_ext.ode.schemes import RK4_BOUND

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "amaml_ext")
NAMES = set(ode.FORWARD_METHODS) | set(ode.ADJOINT_METHODS)


def _name_branches(path):
    """``x == "discrete"``, ``"rk4" in (...)``, ... : comparisons with a scheme name."""
    out = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                consts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                if any(isinstance(c, ast.Constant) and c.value in NAMES for c in consts):
                    out.append(f"{os.path.relpath(path, PKG)}:{node.lineno}")
    return out


def test_no_branch_on_a_scheme_name_outside_the_registry():
    bad = []
    for d, _, files in os.walk(PKG):
        for f in files:
            path = os.path.join(d, f)
            if f.endswith(".py") and path != os.path.join(PKG, "ode", "schemes.py"):
                bad += _name_branches(path)
    assert not bad, bad


def test_the_checker_sees_a_branch(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("def f(a):\n    return a == 'discrete' or a in ('heun', 'x')\n")
    assert len(_name_branches(str(p))) == 2


def test_bounds_come_from_the_step_and_its_span():
    """The bound in h of a scheme is its one-step bound over the intervals a step spans (the RK4
    adjoint steps over pairs: half RK4's; it was once given RK4's own, 2x too loose)."""
    for schemes in (ode.FORWARD_SCHEMES, ode.ADJOINT_SCHEMES):
        for s in schemes.values():
            if s.step_bound is not None:
                assert s.stability_bound == s.step_bound / s.span
    assert ode.ADJOINT_SCHEMES["rk4"].span == 2
    assert ode.STABILITY_BOUNDS["adjoint"]["rk4"] == pytest.approx(RK4_BOUND / 2)
    # the exact adjoint is the reverse of its forward: same step, same bound
    for s in ode.ADJOINT_SCHEMES.values():
        if s.exact_for is not None:
            assert s.stability_bound == ode.FORWARD_SCHEMES[s.exact_for].stability_bound
            assert s.quadrature_order is None and not s.error_estimate
        else:
            assert s.quadrature_order == s.order and s.coarse_stride == 2 * s.span


@pytest.mark.parametrize("method, n", [("heun", 5), ("rk4", 5), ("rk4", 6), ("discrete", 4)])
def test_row_solves_call_back_with_rows(method, n):
    """Callbacks of ode.adjoint_rows name states by absolute grid row (an int), or the odd RK4
    top interval's interpolated midpoint (ode.Midpoint); the states they get are those rows."""
    T, row0 = 1.0, 3
    times = ode.grid_times(T, n) + 0.25           # rows row0..row0+n of a longer grid
    states = torch.arange(n + 1, dtype=torch.float64).reshape(n + 1, 1, 1).expand(n + 1, 1, 2).contiguous()
    seen, nodes = [], []

    def vjp(row, y, v):
        seen.append(row)
        if isinstance(row, int):
            assert torch.equal(y, states[row - row0].reshape(y.shape))
        return -v

    ode.adjoint_rows(vjp, states, [1, 2], times, torch.ones(1, 2, dtype=torch.float64), method, None, row0,
                     lambda row, lam: nodes.append(row))
    ints = [r for r in seen if isinstance(r, int)]
    mids = [r for r in seen if isinstance(r, ode.Midpoint)]
    assert ints and set(ints) <= set(range(row0, row0 + n + 1))
    assert all(isinstance(r, int) for r in nodes) and nodes
    if method == "rk4" and n % 2:
        assert mids and {m.row for m in mids} == {row0 + n - 1}
    else:
        assert not mids


def test_the_cxx_tables_match_the_registry():
    """The C++ drivers look schemes up in their own step tables (csrc/solvers/fixed.cpp,
    adjoint.cpp): the same names, each step's span and the companion's stride as the registry."""
    from amaml_ext.ops.core import C
    adjoint = C.adjoint_schemes()
    assert sorted(adjoint) == sorted(ode.ADJOINT_SCHEMES)
    for name, row in adjoint.items():
        s = ode.ADJOINT_SCHEMES[name]
        assert (row["span"], row["coarse_stride"]) == (s.span, s.coarse_stride), name
    fixed = C.fixed_schemes()
    assert sorted(fixed) == sorted(n for n, s in ode.FORWARD_SCHEMES.items() if not s.adaptive)
    for name, row in fixed.items():
        assert row["span"] == ode.FORWARD_SCHEMES[name].span, name
