"""amaml_ext.ode against closed forms, autograd and torchdiffeq."""

import math

import pytest
import torch

from amaml_ext import ode

from helpers import DEVICES, F64, rel


# ---- problems with closed forms -------------------------------------------------------------

def appendix_a_f(t, y):
    """Paper, Appendix A: dy/dt = -2 t^3 - 2 t y; y(t) = (y0 - 1) e^{-t^2} + 1 - t^2."""
    return -2 * t**3 - 2 * t * y


def appendix_a_vjp(t, y, v):
    return -2 * t * v


def appendix_a_exact(y0, t):
    return (y0 - 1) * math.exp(-t * t) + 1 - t * t


def appendix_a_grad(trajectory, method):
    """lam(0) for L = (y(T) - 3)^6 and the exact dL/dy0 = 6 (y(T) - 3)^5 exp(-T^2)."""
    yT = trajectory.states[-1]
    lam_T = 6 * (yT - 3) ** 5
    exact = lam_T * math.exp(-trajectory.T ** 2)
    return ode.solve_adjoint(appendix_a_vjp, trajectory, lam_T, method=method), exact


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
def test_appendix_a_forward_matches_closed_form(T):
    y0 = torch.tensor([0.3], dtype=F64)
    traj = ode.solve_forward(appendix_a_f, y0, T, T / 50, rtol=1e-10, atol=1e-12)
    exact = torch.tensor([appendix_a_exact(0.3, t) for t in traj.times.tolist()], dtype=F64)
    assert traj.states.shape == (51, 1) and traj.times.dtype == F64
    # dense output at every grid time, not only the end point
    torch.testing.assert_close(traj.states[:, 0], exact, rtol=1e-8, atol=1e-9)
    assert traj.times[-1].item() == T


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("method", ["heun", "rk4"])
def test_appendix_a_gradient_matches_closed_form(T, method):
    traj = ode.solve_forward(appendix_a_f, torch.tensor([1.0], dtype=F64), T, T / 400, rtol=1e-11, atol=1e-12)
    lam0, exact = appendix_a_grad(traj, method)
    assert rel(lam0, exact) < (3e-4 if method == "heun" else 1e-7)
    # and lam_T itself came from y(T) = 1 - T^2, so the gradient matches the closed form in y0
    closed = 6 * (appendix_a_exact(1.0, T) - 3) ** 5 * math.exp(-T * T)
    assert abs(lam0.item() - closed) / abs(closed) < (3e-4 if method == "heun" else 1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
def test_higher_order_adjoint_beats_heun_at_every_n(T):
    for n in list(range(20, 121)) + [127, 160, 255, 320, 501, 640, 1000, 2001]:
        traj = ode.solve_forward(appendix_a_f, torch.tensor([1.0], dtype=F64), T, T / n, rtol=1e-12, atol=1e-12)
        lam_heun, exact = appendix_a_grad(traj, "heun")
        lam_rk4, _ = appendix_a_grad(traj, "rk4")
        e_heun, e_rk4 = rel(lam_heun, exact), rel(lam_rk4, exact)
        assert e_rk4 < e_heun, f"T={T} N={n}: rk4 error {e_rk4:.3e} >= heun error {e_heun:.3e}"


def observed_order(errors, ns):
    """Least-squares slope of log(error) against log(h) = -log(N)."""
    xs = [-math.log(n) for n in ns]
    ys = [math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


@pytest.mark.parametrize("method,order", [("heun", 2), ("rk4", 4), ("discrete", 1)])
def test_adjoint_convergence_order_appendix_a(method, order):
    T, ns, errors = 1.0, [40, 80, 160, 320], []
    for n in ns:
        # The discrete adjoint is the gradient of the Euler map: pair it with the Euler forward.
        fwd = "euler" if method == "discrete" else "dopri5"
        traj = ode.solve_forward(appendix_a_f, torch.tensor([1.0], dtype=F64), T, T / n,
                                 method=fwd, rtol=1e-12, atol=1e-12)
        yT = traj.states[-1]
        lam0 = ode.solve_adjoint(appendix_a_vjp, traj, 6 * (yT - 3) ** 5, method=method)
        closed = 6 * (appendix_a_exact(1.0, T) - 3) ** 5 * math.exp(-T * T)
        errors.append(abs(lam0.item() - closed) / abs(closed))
    assert abs(observed_order(errors, ns) - order) < 0.25, errors


# A nonlinear problem whose VJP depends on the state, so the adjoint's use of the stored
# trajectory (and the odd-N interpolated midpoint of rk4) is exercised.
W = torch.tensor([[0.0, 1.0], [-1.0, -0.2]], dtype=F64)


def pendulum_f(t, y):
    return torch.stack([y[1], -torch.sin(y[0]) - 0.2 * y[1] + 0.1 * math.cos(t)])


def pendulum_vjp(t, y, v):
    # J = [[0, 1], [-cos(y0), -0.2]];  J^T v
    return torch.stack([-torch.cos(y[0]) * v[1], v[0] - 0.2 * v[1]])


@pytest.mark.parametrize("method,order,ns", [("heun", 2, [41, 81, 161, 321]), ("rk4", 4, [21, 41, 81, 161]),
                                              ("rk4", 4, [20, 40, 80, 160])])
def test_adjoint_convergence_order_nonlinear(method, order, ns):
    T, y0, lam_T = 3.0, torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([1.0, -0.5], dtype=F64)
    ref_traj = ode.solve_forward(pendulum_f, y0, T, T / 6400, rtol=1e-13, atol=1e-13)
    reference = ode.solve_adjoint(pendulum_vjp, ref_traj, lam_T, method="rk4")
    errors = []
    for n in ns:
        traj = ode.solve_forward(pendulum_f, y0, T, T / n, rtol=1e-13, atol=1e-13)
        errors.append(rel(ode.solve_adjoint(pendulum_vjp, traj, lam_T, method=method), reference))
    assert abs(observed_order(errors, ns) - order) < 0.3, errors


@pytest.mark.parametrize("method,order", [("rk4", 4), ("euler", 1)])
def test_forward_convergence_order(method, order):
    ns, errors = [20, 40, 80, 160], []
    for n in ns:
        traj = ode.solve_forward(appendix_a_f, torch.tensor([0.5], dtype=F64), 1.0, 1.0 / n, method=method)
        errors.append(abs(traj.states[-1].item() - appendix_a_exact(0.5, 1.0)))
    assert abs(observed_order(errors, ns) - order) < 0.2, errors


# ---- linear systems: gradient through the matrix exponential --------------------------------

def linear_problem(d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d) - 0.5 * torch.eye(d, dtype=F64)
    y0 = torch.randn(d, generator=g, dtype=F64)
    target = torch.randn(d, generator=g, dtype=F64)
    return A, y0, target


@pytest.mark.parametrize("method", ["heun", "rk4"])
def test_linear_system_gradient_matches_matrix_exponential(method):
    A, y0, target = linear_problem()
    T = 1.5
    traj = ode.solve_forward(lambda t, y: A @ y, y0, T, T / 300, rtol=1e-12, atol=1e-12)
    expm = torch.linalg.matrix_exp(A * T)
    torch.testing.assert_close(traj.states[-1], expm @ y0, rtol=1e-10, atol=1e-10)
    # L = 0.5 ||y(T) - target||^2  =>  dL/dy0 = expm(A T)^T (y(T) - target)
    lam_T = traj.states[-1] - target
    lam0 = ode.solve_adjoint(lambda t, y, v: A.T @ v, traj, lam_T, method=method)
    exact = expm.T @ (expm @ y0 - target)
    assert rel(lam0, exact) < (1e-5 if method == "heun" else 1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["dopri5", "rk4", "euler"])
def test_batched_equals_one_task_at_a_time(device, method):
    A, _, _ = linear_problem(d=5)
    A = A.to(device)
    y0 = torch.randn(3, 5, dtype=F64, device=device)
    f = lambda t, y: y @ A.T + math.sin(t)  # noqa: E731  (works for [d] and [B, d])
    vjp = lambda t, y, v: v @ A  # noqa: E731
    batched = ode.solve_forward(f, y0, 1.0, 0.05, method=method, batched=True, rtol=1e-10, atol=1e-12)
    lam_T = torch.randn(3, 5, dtype=F64, device=device)
    lam_b = ode.solve_adjoint(vjp, batched, lam_T, method="rk4")
    assert batched.states.shape == (21, 3, 5)
    for b in range(3):
        single = ode.solve_forward(f, y0[b], 1.0, 0.05, method=method, rtol=1e-10, atol=1e-12)
        t = dict(rtol=1e-9, atol=1e-9) if method == "dopri5" else dict(rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(batched.states[:, b], single.states, **t)
        torch.testing.assert_close(lam_b[b], ode.solve_adjoint(vjp, single, lam_T[b], method="rk4"), **t)


# ---- discrete adjoint = autograd through the Euler loop --------------------------------------

def test_discrete_adjoint_equals_autograd_through_euler():
    g = torch.Generator().manual_seed(1)
    W1 = torch.randn(8, 8, generator=g, dtype=F64) / 3
    c = torch.randn(8, generator=g, dtype=F64)

    def f(t, y):
        return torch.tanh(W1 @ y) * (1 + 0.5 * math.sin(3 * t)) - 0.1 * y**3

    def vjp(t, y, v):
        return torch.func.vjp(lambda z: f(t, z), y)[1](v)[0]

    y0 = torch.randn(8, generator=g, dtype=F64)
    T, h = 2.0, 0.02
    traj = ode.solve_forward(f, y0, T, h, method="euler")
    loss_grad = torch.cos(traj.states[-1]) * c  # L = sum(c * sin(y_N))
    ours = ode.solve_adjoint(vjp, traj, loss_grad, method="discrete")

    y = y0.clone().requires_grad_(True)
    z = y
    for j in range(100):
        z = z + h * f(j * h, z)
    torch.testing.assert_close(traj.states[-1], z.detach(), rtol=1e-14, atol=1e-14)
    (auto,) = torch.autograd.grad((c * torch.sin(z)).sum(), y)
    assert rel(ours, auto) < 1e-12


# ---- DOPRI5 against torchdiffeq -------------------------------------------------------------

@pytest.mark.parametrize("rtol,atol", [(1e-6, 1e-8), (1e-9, 1e-11)])
def test_dopri5_agrees_with_torchdiffeq(rtol, atol):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    T, n = 10.0, 200
    calls = {"ours": 0, "tdq": 0}

    def f_ours(t, y):
        calls["ours"] += 1
        return pendulum_f(t, y)

    def f_tdq(t, y):
        calls["tdq"] += 1
        return pendulum_f(float(t), y)

    ours = ode.solve_forward(f_ours, y0, T, T / n, rtol=rtol, atol=atol)
    theirs = torchdiffeq.odeint(f_tdq, y0, ours.times, method="dopri5", rtol=rtol, atol=atol)
    reference = ode.solve_forward(pendulum_f, y0, T, T / n, rtol=1e-13, atol=1e-13).states
    err_ours = (ours.states - reference).abs().max().item()
    err_theirs = (theirs - reference).abs().max().item()
    # Same answer within the tolerance, and neither much less accurate than the other.
    assert (ours.states - theirs).abs().max().item() < 200 * rtol
    assert err_ours < 10 * err_theirs + 10 * atol
    assert ours.stats.function_evals == calls["ours"]
    assert 0.5 < calls["ours"] / calls["tdq"] < 2.0, calls


def test_dopri5_counts_steps_and_rejections():
    # A stiff-ish start with a too-large first step forces rejections.
    traj = ode.solve_forward(lambda t, y: -50 * (y - math.cos(t)), torch.tensor([2.0], dtype=F64),
                             1.0, 0.1, initial_step=0.5)
    s = traj.stats
    assert s.rejected_steps >= 1 and s.accepted_steps >= 5
    assert s.function_evals == 1 + 6 * (s.accepted_steps + s.rejected_steps)
    assert abs(traj.states[-1].item() - math.cos(1.0)) < 0.05


@pytest.mark.parametrize("device", DEVICES)
def test_float32_and_callback_aliasing(device):
    # f returns its argument itself: the driver must copy it before reusing its buffers.
    y0 = torch.ones(3, device=device)
    for method in ode.FORWARD_METHODS:
        traj = ode.solve_forward(lambda t, y: y, y0, 1.0, 0.01, method=method)
        expect = math.e if method != "euler" else 1.01**100
        torch.testing.assert_close(traj.states[-1], torch.full_like(y0, expect), rtol=1e-5, atol=1e-5)
    lam0 = ode.solve_adjoint(lambda t, y, v: v, traj, torch.ones_like(y0), method="rk4")
    torch.testing.assert_close(lam0, torch.full_like(y0, math.e), rtol=1e-5, atol=1e-5)


# ---- errors -----------------------------------------------------------------------------

def test_bad_arguments_get_clear_errors():
    y0 = torch.ones(2, dtype=F64)
    f = lambda t, y: -y  # noqa: E731
    with pytest.raises(ValueError, match=r"T / h must be a whole number of steps, got T=1.0, h=0.3"):
        ode.solve_forward(f, y0, 1.0, 0.3)
    with pytest.raises(ValueError, match=r"argument 'h' must be <= T"):
        ode.solve_forward(f, y0, 1.0, 2.0)
    with pytest.raises(ValueError, match=r"argument 'T' must be finite and > 0, got -1.0"):
        ode.solve_forward(f, y0, -1.0, 0.1)
    with pytest.raises(ValueError, match=r"argument 'method' must be one of \('dopri5', 'rk4', 'euler'\), got 'rk45'"):
        ode.solve_forward(f, y0, 1.0, 0.1, method="rk45")
    with pytest.raises(TypeError, match=r"argument 'y0' must be float32 or float64, got torch.int64"):
        ode.solve_forward(f, torch.ones(2, dtype=torch.long), 1.0, 0.1)
    with pytest.raises(ValueError, match=r"argument 'y0' must be finite"):
        ode.solve_forward(f, torch.tensor([1.0, float("nan")]), 1.0, 0.1)
    with pytest.raises(TypeError, match=r"argument 'f' must be callable"):
        ode.solve_forward(None, y0, 1.0, 0.1)
    traj = ode.solve_forward(f, y0, 1.0, 0.1)
    with pytest.raises(ValueError, match=r"argument 'method' must be one of \('heun', 'rk4', 'discrete'\)"):
        ode.solve_adjoint(lambda t, y, v: -v, traj, y0, method="euler")
    with pytest.raises(ValueError, match=r"argument 'lam_T' must have the state's shape \(2,\), got \(3,\)"):
        ode.solve_adjoint(lambda t, y, v: -v, traj, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match=r"'lam_T' must match the trajectory's dtype and device"):
        ode.solve_adjoint(lambda t, y, v: -v, traj, torch.ones(2))


@pytest.mark.parametrize("method", ode.FORWARD_METHODS)
def test_callback_mistakes_are_reported(method):
    y0 = torch.ones(2, dtype=F64)
    with pytest.raises(ValueError, match=r"f\(t, y\) must return a tensor of shape \[2\].*got shape \[3\]"):
        ode.solve_forward(lambda t, y: torch.ones(3, dtype=F64), y0, 1.0, 0.1, method=method)
    with pytest.raises(TypeError, match=r"f\(t, y\) must return a torch.Tensor, got float"):
        ode.solve_forward(lambda t, y: 1.0, y0, 1.0, 0.1, method=method)
    with pytest.raises(ZeroDivisionError):
        ode.solve_forward(lambda t, y: y / 0 if False else 1 / 0, y0, 1.0, 0.1, method=method)


@pytest.mark.parametrize("method", ode.FORWARD_METHODS)
def test_non_finite_solution_names_the_time(method):
    def f(t, y):
        return y * (float("inf") if t >= 0.5 else -1.0)

    with pytest.raises(ValueError, match=r"non-finite.*t=0\.[45]"):
        ode.solve_forward(f, torch.ones(2, dtype=F64), 1.0, 0.1, method=method)


def test_max_steps_guard():
    with pytest.raises(ValueError, match=r"reached max_steps=5 at t="):
        ode.solve_forward(lambda t, y: -1000 * (y - math.sin(t)), torch.ones(1, dtype=F64), 1.0, 0.5,
                          max_steps=5, rtol=1e-10, atol=1e-12)


def test_adjoint_non_finite_is_reported():
    traj = ode.solve_forward(lambda t, y: -y, torch.ones(2, dtype=F64), 1.0, 0.1)
    with pytest.raises(ValueError, match=r"adjoint became non-finite"):
        ode.solve_adjoint(lambda t, y, v: v * float("inf"), traj, torch.ones(2, dtype=F64))


def test_scheme_registry_matches_the_drivers():
    """Every scheme of the registry has an entry of its name in the C++ step tables and back;
    accuracy's orders and bounds are the registry's."""
    from amaml_ext import _C, accuracy

    on_grid = [name for name, s in ode.FORWARD_SCHEMES.items() if not s.adaptive]
    assert sorted(on_grid) == sorted(_C.fixed_schemes())
    assert sorted(ode.ADJOINT_SCHEMES) == sorted(_C.adjoint_schemes())
    assert ode.FORWARD_METHODS == ("dopri5", "rk4", "euler") and ode.ADJOINT_METHODS == ("heun", "rk4", "discrete")
    assert accuracy.ORDERS is ode.ORDERS and accuracy.STABILITY_BOUNDS is ode.STABILITY_BOUNDS
    assert accuracy.richardson is ode.richardson
    traj = ode.solve_forward(lambda t, y: -y, torch.ones(1, 2, dtype=F64), 1.0, 0.5, method="euler", batched=True)
    with pytest.raises(ValueError, match=r"unknown method 'nope' \(one of heun, rk4, discrete\)"):
        _C.adjoint_solve(lambda t, y, v: v, traj.states, [1, 2], traj.times, torch.ones(1, 2, dtype=F64), "nope")
